"""LLV-FSR trained on cached prior files (priorface priors): model config, provenance, refusals."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from priorface.inference.degradations import degrade
from priorface.inference.images import load_image_file, resize_bchw
from priorface.inference.llvfsr_restore import load_llvfsr_model, upscale_faces
from priorface.inference.priors import batch as batch_module
from priorface.inference.priors.batch import ExtraExtractor, extract_priors_for_folder, file_seed
from priorface.inference.priors.bundle import PriorBundle, PriorMismatchError, TextEmbedding
from priorface.inference.priors.bundle_io import concat_bundles, read_prior_file, write_prior_file
from priorface.training.datasets import FaceDataset, FaceDatasetConfig, parse_utkface_name
from priorface.training.llvfsr_task import LLVFSRTask, LLVFSRTaskConfig
from priorface.training.loop import TrainConfig, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
UTK = SHARED / "train" / "utkface"
FFHQ = SHARED / "dev" / "ffhq"
TINY = {"width": 8, "depth": 1, "heads": 2, "window": 4, "upsampler_width": 8, "prior_dropout": 0.3}
TEXT_WIDTH = 32  # the stub "CLIP": not MiniLM's 384, so the model's text width must follow the files
RUN = {"degradation": "bicubic_x8", "size": 128, "template": "utkface", "seed": 0}

pytestmark = pytest.mark.skipif(not (UTK.is_dir() and FFHQ.is_dir()), reason="shared face data not present")


def _toy_depth(images: torch.Tensor, labels) -> PriorBundle:
    """Stub depth extractor: the grey level of the (degraded) face, so tests can recompute it."""
    depth = images.mean(1, keepdim=True)
    return PriorBundle(images.shape[0]).with_prior("depth", depth, {"extractor": "toy-depth-v1"})


def _toy_clip(images: torch.Tensor, labels) -> PriorBundle:
    """Stub text embedding: 2-4 tokens per face (varying lengths exercise the padding)."""
    b = images.shape[0]
    lengths = [2 + int(images[i].mean() * 1000) % 3 for i in range(b)]
    mask = torch.zeros(b, 4, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(b, 4, TEXT_WIDTH, generator=g) * mask[..., None]
    emb = TextEmbedding(tokens, mask, tokens.sum(1) / mask.sum(1, keepdim=True))
    return PriorBundle(b).with_prior(
        "caption_embedding", emb, {"extractor": "toy-clip-v1", "width": TEXT_WIDTH}
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """4 UTKFace training faces and 2 FFHQ validation faces with their prior files."""
    root = tmp_path_factory.mktemp("cached")
    faces = root / "faces"
    faces.mkdir()
    for p in sorted(UTK.glob("*.jpg"))[:4]:
        shutil.copy(p, faces / p.name)
    val_src = root / "val_src"
    val_src.mkdir()
    for p in sorted(FFHQ.glob("*.png"))[:2]:
        shutil.copy(p, val_src / p.name)
    mp = pytest.MonkeyPatch()
    mp.setitem(
        batch_module.EXTRA_EXTRACTORS, "toy_depth", ExtraExtractor(_toy_depth, ("depth",), "toy-depth-v1")
    )
    mp.setitem(
        batch_module.EXTRA_EXTRACTORS,
        "toy_clip",
        ExtraExtractor(_toy_clip, ("caption_embedding",), "toy-clip-v1"),
    )
    try:
        opts = dict(extractors=["mask", "toy_depth", "toy_clip"], **RUN, labels_fn=parse_utkface_name)
        extract_priors_for_folder(faces, root / "priors", **opts)
        cfg = LLVFSRTaskConfig(
            train_dirs=[str(faces)],
            val_dirs=[str(val_src)],
            priors=["mask", "depth", "caption"],
            model=TINY,
            priors_dir=str(root / "priors"),
            val_priors_dir=str(root / "val_priors"),
        )
        val_faces = LLVFSRTask(cfg).write_val_faces(root / "val_faces")
        extract_priors_for_folder(val_faces, root / "val_priors", **opts)
    finally:
        mp.undo()
    return root, cfg


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train(
        LLVFSRTask(cache[1]), TrainConfig(out_dir=str(out), steps=2, batch_size=2, val_every=2, ckpt_every=2)
    )
    return out, summary


def test_batches_hold_the_cached_priors_of_the_lq_face(cache):
    root, cfg = cache
    task = LLVFSRTask(cfg)
    ds = task.train_set()
    items = [ds[i] for i in range(3)]
    batch = task.collate(items, torch.device("cpu"))
    assert set(batch["priors"]) == {"mask", "depth", "caption"}
    # The depth stub saw the degraded face (x8 bicubic at 128 px), not the HQ one.
    path, rel = ds.files[1]
    hq = resize_bchw(load_image_file(path)[None], 128, 128)
    lq, _ = degrade(hq, "bicubic_x8", file_seed(0, rel), "input")
    assert torch.allclose(batch["priors"]["depth"][1], lq.mean(1)[0][None], atol=1e-5)
    assert not torch.allclose(batch["priors"]["depth"][1], hq.mean(1)[0][None], atol=1e-2)
    files = [read_prior_file(root / "priors" / f"{Path(r).stem}.safetensors")[0] for _p, r in ds.files[:3]]
    assert torch.equal(batch["priors"]["mask"][1], files[1].mask[0])
    cap = batch["priors"]["caption"]
    lengths = [int(f.caption_embedding.attention_mask.sum()) for f in files]
    assert len(set(lengths)) > 1 and cap.tokens.shape == (3, max(lengths), TEXT_WIDTH)
    for i, (one, n) in enumerate(zip(files, lengths, strict=True)):
        assert cap.attention_mask[i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert torch.equal(cap.tokens[i, :n], one.caption_embedding.tokens[0])


def test_model_config_follows_the_files(cache):
    task = LLVFSRTask(cache[1])
    mc = task.model_config()
    assert (mc.text_dim, mc.mask_classes, mc.disabled_priors) == (TEXT_WIDTH, 5, ("description",))
    with pytest.raises(ValueError, match="model.text_dim is 384"):
        LLVFSRTask(replace(cache[1], model={**TINY, "text_dim": 384})).model_config()


@pytest.mark.slow
def test_training_exports_the_extractors_and_inference_refuses_others(cache, trained):
    root, _cfg = cache
    out, summary = trained
    assert summary["step"] == 2 and "psnr_gain" in summary["validation"]
    llvfsr = load_llvfsr_model(out / "latest.safetensors")
    assert {k: v["extractor"] for k, v in llvfsr.trained_with.items()} == {
        "mask": "landmark-mask-v1",
        "depth": "toy-depth-v1",
        "caption_embedding": "toy-clip-v1",
    }
    files = sorted((root / "priors").glob("*.safetensors"))[:2]
    bundle = concat_bundles([read_prior_file(f)[0] for f in files])
    faces = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert upscale_faces(llvfsr, faces, bundle).shape == (2, 3, 128, 128)
    minilm = bundle.with_prior(
        "caption_embedding", bundle.caption_embedding, {"extractor": "text-encoder:all-MiniLM-L6-v2"}
    )
    with pytest.raises(PriorMismatchError, match="toy-clip-v1"):
        upscale_faces(llvfsr, faces, minilm)
    sam = bundle.with_prior("mask", bundle.mask, {"extractor": "sam:vit_b"})
    with pytest.raises(PriorMismatchError, match="landmark-mask-v1"):
        upscale_faces(llvfsr, faces, sam)


def _copy_priors(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root / "priors", tmp_path / "priors")
    return tmp_path / "priors"


def test_missing_or_mixed_prior_files_are_refused(cache, tmp_path):
    root, cfg = cache
    priors = _copy_priors(root, tmp_path)
    cfg = replace(cfg, priors_dir=str(priors), val_dirs=[], val_priors_dir=None)
    victim = sorted(priors.glob("*.safetensors"))[2]
    one, extra = read_prior_file(victim)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        LLVFSRTask(cfg).train_set()
    other = one.with_prior("depth", one.depth, {"extractor": "depth-anything-small"})
    write_prior_file(victim, other, 0, extra)
    with pytest.raises(ValueError, match="mixed prior files.*depth-anything-small"):
        LLVFSRTask(cfg).train_set()
    victim.write_bytes(victim.read_bytes()[:-8])  # truncated: counts as missing
    with pytest.raises(FileNotFoundError, match=victim.name):
        LLVFSRTask(cfg).model_config()


def test_settings_that_cannot_match_the_cache_are_refused(cache):
    cfg = replace(cache[1], val_dirs=[], val_priors_dir=None)
    with pytest.raises(ValueError, match="--degradation bicubic_x4"):
        LLVFSRTask(replace(cfg, degradation="bicubic_x4")).train_set()
    with pytest.raises(ValueError, match="no \\['description_embedding'\\] prior"):
        LLVFSRTask(replace(cfg, priors=["mask", "description"])).model_config()
    with pytest.raises(ValueError, match="align_train"):
        LLVFSRTask(replace(cfg, align_train=True))
    with pytest.raises(ValueError, match="val_priors_dir"):
        LLVFSRTask(replace(cfg, val_dirs=["x"]))
    with pytest.raises(ValueError, match="priors must be some of"):
        LLVFSRTask(replace(cfg, priors=["caption_embedding"]))


def test_the_prior_scan_covers_exactly_the_faces_the_training_split_serves(monkeypatch):
    import priorface.training.llvfsr_task as task_module

    scanned = []

    def fake_scan(folder, stems, *args):
        scanned.extend(stems)
        raise RuntimeError("scanned")  # stop before any file is read

    monkeypatch.setattr(task_module, "scan_prior_files", fake_scan)
    cfg = LLVFSRTaskConfig(
        train_dirs=[str(UTK)], model=TINY, max_train_items=40, train_split="train", priors_dir="unused"
    )
    with pytest.raises(RuntimeError, match="scanned"):
        LLVFSRTask(cfg).model_config()
    served = FaceDataset(
        FaceDatasetConfig(hq_dirs=[str(UTK)], split="train", max_items=40, degradation="bicubic_x8")
    ).files
    assert scanned == [str(Path(rel).with_suffix("")) for _p, rel in served]
    everything = FaceDataset(FaceDatasetConfig(hq_dirs=[str(UTK)], split="all", max_items=40)).files
    assert served != everything  # the held-out faces really change which 40 files come first
