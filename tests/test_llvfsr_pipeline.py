"""LLV-FSR training task, export with provenance, inference with priors, whole photos, nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
