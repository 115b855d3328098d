"""LLV-FSR training task, export with provenance, inference with priors, whole photos, nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from priorface.inference.face_align import mirror_landmarks
from priorface.inference.llvfsr_restore import load_llvfsr_model, restore_photo, upscale_faces
from priorface.inference.priors.bundle import PriorBundle, PriorMismatchError
from priorface.training.llvfsr_task import LLVFSRTask, LLVFSRTaskConfig
from priorface.training.loop import TrainConfig, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
TINY = {"width": 8, "depth": 1, "heads": 2, "window": 4, "upsampler_width": 8, "prior_dropout": 0.3}

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="shared face data not present")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("llvfsr")
    cfg = LLVFSRTaskConfig(
        train_dirs=[str(SHARED / "train" / "utkface")],
        val_dirs=[str(SHARED / "dev" / "pairs" / "hq")],
        model=TINY,
        max_train_items=16,
    )
    summary = train(
        LLVFSRTask(cfg), TrainConfig(out_dir=str(out), steps=4, batch_size=4, val_every=4, ckpt_every=2)
    )
    return out, summary


def test_train_split_holds_out_the_val_faces():
    from priorface.training.datasets import split_of

    cfg = dict(train_dirs=[str(SHARED / "train" / "utkface")], model=TINY, max_train_items=40)
    names = [rel for _p, rel in LLVFSRTask(LLVFSRTaskConfig(**cfg, train_split="train")).train_set().files]
    assert len(names) == 40 and all(split_of(n, 0.05) == "train" for n in names)
    everything = [rel for _p, rel in LLVFSRTask(LLVFSRTaskConfig(**cfg)).train_set().files]
    assert any(split_of(n, 0.05) == "val" for n in everything)
    with pytest.raises(ValueError, match="train_split"):
        LLVFSRTask(LLVFSRTaskConfig(**cfg, train_split="val"))


def test_training_writes_weights_samples_and_curves(trained):
    out, summary = trained
    assert summary["step"] == 4 and {"psnr", "psnr_bicubic", "psnr_gain"} <= set(summary["validation"])
    assert (out / "latest.safetensors").is_file() and (out / "curves.png").is_file()
    assert Image.open(out / "samples" / "step_000004.png").width > 4 * 128


def test_export_records_the_priors_it_was_trained_with(trained):
    llvfsr = load_llvfsr_model(trained[0] / "latest.safetensors")
    assert llvfsr.trained_with["mask"]["extractor"] == "landmark-mask-v1"
    assert llvfsr.trained_with["caption_embedding"]["extractor"].startswith("text-encoder:")
    assert llvfsr.out_size == 128 and llvfsr.template == "utkface"


def test_upscale_with_default_and_refused_priors(trained):
    llvfsr = load_llvfsr_model(trained[0] / "latest.safetensors")
    faces = torch.rand(2, 3, 40, 40)
    assert upscale_faces(llvfsr, faces).shape == (2, 3, 128, 128)
    alien = PriorBundle(batch_size=2).with_prior(
        "mask", torch.zeros(2, 5, 128, 128), {"extractor": "sam:vit_b:sam_vit_b_01ec64"}
    )
    with pytest.raises(PriorMismatchError, match="landmark-mask-v1"):
        upscale_faces(llvfsr, faces, alien)


def _photo(name):
    arr = np.asarray(Image.open(SHARED / "whole" / name).convert("RGB"), np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def test_whole_photo_restores_small_faces_and_leaves_large_ones(trained):
    llvfsr = load_llvfsr_model(trained[0] / "latest.safetensors")
    group = _photo("gpen_Solvay_conference_1927.png")
    small = torch.nn.functional.interpolate(group, scale_factor=1 / 3, mode="bicubic", antialias=True).clamp(
        0, 1
    )
    out, data, report = restore_photo(llvfsr, small, upscale=3.0, max_faces=3, upsample=2)
    assert out.shape[-2:] == (small.shape[-2] * 3, small.shape[-1] * 3)
    assert len(report) == 3 and all(line.endswith("restored") for line in report)  # eye distance ~6 px
    image = _photo("gfpgan_Blake_Lively.jpg")
    out, data, report = restore_photo(llvfsr, image, upscale=1.0)
    assert out.shape == image.shape and len(report) == len(data.faces) == 2
    # Both faces (eye distances ~45 and ~83 px) are sharper than the network's 6-px input: untouched.
    assert all("left as is" in line for line in report)
    assert torch.equal(out, image)


def test_nodes(comfy_env, check_outputs, trained):
    folder = comfy_env.models_dir / "priorface" / "llvfsr"
    folder.mkdir(parents=True)
    (folder / "mine.safetensors").write_bytes((trained[0] / "latest.safetensors").read_bytes())
    m = comfy_env.nodes.NODE_CLASS_MAPPINGS
    loader = m["PriorFaceLLVFSRLoader"]
    assert "mine.safetensors" in loader.INPUT_TYPES()["required"]["weights"][0]
    (llvfsr,) = loader().load("mine.safetensors")
    (faces,) = check_outputs(
        m["PriorFaceLLVFSRUpscale"], m["PriorFaceLLVFSRUpscale"]().upscale(llvfsr, torch.rand(1, 16, 16, 3))
    )
    assert faces.shape == (1, 128, 128, 3)
    node = m["PriorFaceLLVFSRRestorePhoto"]
    image, report = check_outputs(
        node,
        node().restore(
            llvfsr, torch.full((1, 64, 80, 3), 0.4), "dlib (embedded, no download)", 2.0, 1.0, "wavelet"
        ),
    )
    assert image.shape == (1, 128, 160, 3) and report == "no face found"


def _utk_task(**kw) -> LLVFSRTask:
    return LLVFSRTask(
        LLVFSRTaskConfig(
            **{"train_dirs": [str(SHARED / "train" / "utkface")], "model": TINY, "max_train_items": 8, **kw}
        )
    )


def test_cached_training_faces_train_exactly_like_uncached_ones(tmp_path):
    """cache_train_items (for GPUs, where decoding limits the step rate) changes speed, not the run."""
    from priorface.models.checkpoint import read_checkpoint

    weights = []
    for cache in (False, True):
        task = _utk_task(hflip=True, cache_train_items=cache)
        out = tmp_path / f"cache-{cache}"
        train(
            task, TrainConfig(out_dir=str(out), steps=5, batch_size=4, val_every=100, ckpt_every=100, seed=3)
        )
        weights.append(read_checkpoint(out / "latest.safetensors").content)
        assert len(task.train_set()._cache) == (8 if cache else 0)  # filled before the first step
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_hflip_mirrors_face_input_and_mask_together():
    plain, flipping = _utk_task().train_set(), _utk_task(hflip=True).train_set()
    flipped = [i for i in range(8) if '"hflip": true' in flipping[i]["degradation"]]
    assert 0 < len(flipped) < 8  # seeded coin per item
    i = flipped[0]
    assert torch.equal(flipping[i]["hq"], plain[i]["hq"].flip(-1))
    assert torch.equal(flipping[i]["lq"], plain[i]["lq"].flip(-1))
    task, item = _utk_task(hflip=True), flipping[i]
    straight = task.priors_for([item["labels"]] * 2, "cpu")["mask"]
    mirrored = task.collate([item, plain[i]], torch.device("cpu"))["priors"]["mask"]
    assert not torch.equal(straight[0], straight[0].flip(-1))  # the test would be void otherwise
    assert torch.equal(mirrored[0], straight[0].flip(-1)) and torch.equal(mirrored[1], straight[1])
    # Aligned faces on the template's points mirror the same way (their landmarks are one shared row).
    aligned = _utk_task(hflip=True, align_train=True)
    items = [{"degradation": json.dumps({"hflip": f}), "landmarks": item["landmarks"]} for f in (True, False)]
    pair = aligned.priors_for([{}, {}], "cpu", aligned.batch_landmarks(items))["mask"]
    assert torch.equal(pair[0], pair[1].flip(-1)) and not torch.equal(pair[0], pair[1])


def test_hq_usm_sharpens_the_training_face_before_degrading_it():
    from priorface.inference.degradations.matlab_resize import bicubic_downsample

    def laplacian_var(x):
        k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
        return torch.nn.functional.conv2d(x.mean(0)[None, None], k).var().item()

    plain, sharp = _utk_task().train_set()[0], _utk_task(hq_usm=[1.0, 7]).train_set()[0]
    assert laplacian_var(sharp["hq"]) > 1.5 * laplacian_var(plain["hq"])
    # The LR is degraded from the sharpened face: the pair stays consistent.
    lr = bicubic_downsample(sharp["hq"][None], 8)[0]
    assert torch.allclose(sharp["lq"], lr.clamp(0, 1), atol=1.5 / 255)


def test_init_from_starts_from_weights_of_the_same_config(trained):
    weights = trained[0] / "latest.safetensors"
    started = _utk_task(init_from=str(weights)).build_model()
    reference = load_llvfsr_model(weights).model
    assert all(
        torch.equal(a, b)
        for a, b in zip(started.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="init_from .* another model config.*width"):
        LLVFSRTask(
            LLVFSRTaskConfig(
                train_dirs=[str(SHARED / "train" / "utkface")],
                model={**TINY, "width": 16},
                init_from=str(weights),
            )
        ).build_model()


def test_own_mask_landmarks_follow_each_face_through_its_alignment(tmp_path):
    from priorface.inference.face_align import template_points

    names = [rel for _p, rel in _utk_task().train_set().files[:3]]
    template = torch.from_numpy(template_points("utkface", 128)).float()
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (template.numpy() * 1.4) @ rot.T + [20.0, 5.0]  # a similarity of the template, in source pixels
    odd = moved.copy()
    odd[3] += [0.0, 9.0]  # this face's left mouth corner sits lower than the template's
    path = tmp_path / "landmarks.json"
    # The third face has no entry: the template is its guess.
    path.write_text(json.dumps({names[0]: moved.tolist(), names[1]: odd.tolist()}))
    kw = dict(align_train=True, landmarks_json=str(path), max_train_items=3)
    own_task = _utk_task(**kw, mask_landmarks="own")
    items = [own_task.train_set()[i] for i in range(3)]
    own = own_task.batch_landmarks(items)
    assert torch.allclose(own[0], template, atol=1e-3)
    assert (own[1] - template).norm(dim=1).max() > 2.0
    assert torch.equal(own[2], template) and torch.isnan(items[2]["landmarks"]).all()
    fixed = _utk_task(**kw).batch_landmarks(items)
    assert torch.equal(fixed[1], template)
    # Flipped: the face's own points mirrored along with it.
    flip_task = _utk_task(**kw, mask_landmarks="own", hflip=True)
    ds = flip_task.train_set()
    flipped = [it for it in (ds[i] for i in range(3)) if '"hflip": true' in it["degradation"]]
    assert flipped  # the seeded coins flip at least one of the three (else the loop tests nothing)
    for it in flipped:
        i = names.index(
            next(rel for _p, rel in ds.files if Path(rel).with_suffix("").as_posix() == it["name"])
        )
        want = mirror_landmarks(own[i], 128) if i < 2 else mirror_landmarks(template, 128)
        assert torch.allclose(flip_task.batch_landmarks([it])[0], want, atol=1e-5)
    with pytest.raises(ValueError, match="mask_landmarks"):
        _utk_task(mask_landmarks="detected")


def test_description_prior_trains_exports_and_restores(tmp_path):
    from priorface.inference.llvfsr_restore import default_priors

    task = _utk_task(priors=["mask", "caption", "description"], hflip=True)
    task.cfg.model = {**TINY, "prior_dropout": 0.0}  # every branch sees its prior in this step
    batch = task.collate([task.train_set()[i] for i in range(2)], torch.device("cpu"))
    assert set(batch["priors"]) == {"mask", "caption", "description"}
    model = task.build_model()
    loss, _ = task.training_loss(model, batch, 0)
    loss.backward()
    grad = model.encoders["description"].linear.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    task.export(model, tmp_path / "w.safetensors", 0)
    llvfsr = load_llvfsr_model(tmp_path / "w.safetensors")
    assert {"mask", "caption_embedding", "description_embedding"} == set(llvfsr.trained_with)
    faces = torch.rand(2, 3, 16, 16)
    priors = default_priors(llvfsr, faces, None)
    # Drawn at the output size, as the training masks were, whatever the input size.
    assert priors.mask.shape[-2:] == (128, 128) and priors.description_embedding.pooled.shape[0] == 2
    assert upscale_faces(llvfsr, faces).shape == (2, 3, 128, 128)


def test_default_priors_take_landmarks_in_the_input_frame():
    from priorface.inference.face_align import template_points
    from priorface.inference.llvfsr_restore import default_priors

    path = Path(__file__).resolve().parents[1] / "weights" / "llvfsr-x8.safetensors"
    llvfsr = load_llvfsr_model(path)
    faces = torch.rand(1, 3, 16, 16)
    at16 = torch.from_numpy(template_points("utkface", 16)).float()[None]
    same = default_priors(llvfsr, faces, at16).mask
    assert torch.equal(same, default_priors(llvfsr, faces, None).mask)
    lower = at16.clone()
    lower[:, 3:, 1] += 1.0  # mouth one input pixel (8 output pixels) lower
    assert not torch.equal(default_priors(llvfsr, faces, lower).mask, same)
