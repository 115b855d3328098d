"""Face datasets: stable splits, deterministic LQ per (seed, epoch, index), precomputed LQ, labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from priorface.training.datasets import (
    FaceDataset,
    FaceDatasetConfig,
    lookup_landmarks,
    parse_utkface_name,
    precompute_lq,
    split_of,
)

UTKFACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "train" / "utkface"


@pytest.fixture
def faces_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "hq"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        arr = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        name = f"{20 + i}_{i % 2}_{i % 5}_2017.jpg" if i < 10 else f"sub/face{i}.png"
        Image.fromarray(arr).save(root / name)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "gray.png")  # grayscale becomes RGB
    return root


def test_split_is_stable_and_disjoint(faces_dir):
    cfg = dict(hq_dirs=[str(faces_dir)], size=32, degradation="bicubic_x4", val_fraction=0.3)
    train = FaceDataset(FaceDatasetConfig(**cfg, split="train"))
    val = FaceDataset(FaceDatasetConfig(**cfg, split="val"))
    names_train = {rel for _p, rel in train.files}
    names_val = {rel for _p, rel in val.files}
    assert not names_train & names_val and len(names_train | names_val) == 13
    assert all(split_of(n, 0.3) == "val" for n in names_val)


def test_split_seed_keeps_the_split_while_seed_changes_the_draws(faces_dir):
    cfg = dict(hq_dirs=[str(faces_dir)], size=32, degradation="blind", val_fraction=0.3, split="val")
    base = FaceDataset(FaceDatasetConfig(**cfg))
    other = FaceDataset(FaceDatasetConfig(**cfg, seed=1234, split_seed=0))
    reseeded = FaceDataset(FaceDatasetConfig(**cfg, seed=1234))
    assert other.files == base.files and reseeded.files != base.files
    assert not torch.equal(other[0]["lq"], base[0]["lq"])  # LQ draws follow seed


def test_items_are_deterministic_per_epoch(faces_dir):
    cfg = FaceDatasetConfig(hq_dirs=[str(faces_dir)], size=32, degradation="blind", split="all", hflip=True)
    a, b = FaceDataset(cfg), FaceDataset(cfg)
    x, y = a[3], b[3]
    assert x["hq"].shape == (3, 32, 32) and x["lq"].shape == (3, 32, 32)
    assert torch.equal(x["lq"], y["lq"]) and x["degradation"] == y["degradation"]
    b.set_epoch(1)
    assert not torch.equal(a[3]["lq"], b[3]["lq"]), "a new epoch must draw a new degradation"
    assert a[0]["labels"] == {"age": 20, "gender": "male", "race": "white"}


def test_lr_size_and_bicubic(faces_dir):
    cfg = FaceDatasetConfig(
        hq_dirs=[str(faces_dir)], size=32, degradation="bicubic_x8", lq_size="lr", split="all"
    )
    item = FaceDataset(cfg)[0]
    assert item["lq"].shape == (3, 4, 4)


def test_precomputed_lq_round_trip(faces_dir, tmp_path):
    cfg = FaceDatasetConfig(hq_dirs=[str(faces_dir)], size=32, degradation="blind", split="all")
    ds = FaceDataset(cfg)
    out = precompute_lq(ds, tmp_path / "lq")
    assert (out / "degradations.json").is_file()
    pre = FaceDataset(
        FaceDatasetConfig(
            hq_dirs=[str(faces_dir)], size=32, degradation="precomputed", lq_dir=str(out), split="all"
        )
    )
    for i in (0, 11):
        assert torch.allclose(pre[i]["lq"], ds[i]["lq"], atol=0.5 / 255 + 1e-6)
    (out / "sub" / "face11.png").unlink()
    with pytest.raises(FileNotFoundError, match="face11"):
        FaceDataset(
            FaceDatasetConfig(
                hq_dirs=[str(faces_dir)], size=32, degradation="precomputed", lq_dir=str(out), split="all"
            )
        )


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        FaceDataset(FaceDatasetConfig(hq_dirs=[str(tmp_path / "nope")]))
    with pytest.raises(ValueError, match="degradation"):
        FaceDataset(FaceDatasetConfig(hq_dirs=[str(tmp_path)], degradation="sharpen"))


def test_utkface_names():
    assert parse_utkface_name("100_1_2_20170110183726390.jpg") == {
        "age": 100,
        "gender": "female",
        "race": "asian",
    }
    assert parse_utkface_name("00001.png") is None


@pytest.mark.skipif(not UTKFACE.is_dir(), reason="shared UTKFace subset not present")
def test_real_utkface_subset():
    ds = FaceDataset(
        FaceDatasetConfig(
            hq_dirs=[str(UTKFACE)], size=64, degradation="bicubic_x4", split="val", val_fraction=0.05
        )
    )
    assert 350 < len(ds) < 650  # about 5% of 10,000, by hash
    item = ds[0]
    assert item["labels"]["gender"] in ("male", "female") and item["hq"].shape == (3, 64, 64)


FFHQ = UTKFACE.parents[1] / "dev" / "ffhq"


@pytest.mark.skipif(not FFHQ.is_dir(), reason="shared FFHQ faces not present")
def test_realign_ffhq_faces_to_the_utkface_template():
    from priorface.inference.face_align import template_points
    from priorface.inference.face_detection import detect_faces

    cfg = FaceDatasetConfig(
        hq_dirs=[str(FFHQ)], size=128, degradation="bicubic_x4", split="all", align="utkface", max_items=2
    )
    item = FaceDataset(cfg)[0]
    assert item["hq"].shape == (3, 128, 128)
    # The re-aligned face's eyes sit where the tight template puts them (within a few pixels).
    found = detect_faces(item["hq"].unsqueeze(0), "dlib", upsample=1)
    eyes = template_points("utkface", 128)[:2]
    assert found and np.abs(found[0].landmarks[:2] - eyes).max() < 6
    with pytest.raises(ValueError, match="align"):
        FaceDataset(FaceDatasetConfig(hq_dirs=[str(FFHQ)], align="square"))


@pytest.mark.skipif(not FFHQ.is_dir(), reason="shared FFHQ faces not present")
def test_landmark_table_lookup_by_name_stem_or_file_name():
    table = {"a/1.jpg": [[1, 1]] * 5, "b/2": [[2, 2]] * 5, "3.png": [[3, 3]] * 5}
    assert lookup_landmarks(table, "a/1.jpg")[0] == [1, 1]
    assert lookup_landmarks(table, "b/2.jpg")[0] == [2, 2]
    assert lookup_landmarks(table, "c/3.png")[0] == [3, 3]
    assert lookup_landmarks(table, "a/4.jpg") is None


def test_reframing_from_a_known_template_puts_eyes_on_the_template():
    from priorface.inference.face_align import template_points
    from priorface.inference.face_detection import detect_faces

    common = dict(
        hq_dirs=[str(FFHQ)], size=128, degradation="bicubic_x4", split="all", align="utkface", max_items=3
    )
    reframed = FaceDataset(FaceDatasetConfig(**common, source_template="ffhq"))
    eyes = template_points("utkface", 128)[:2]
    for i in range(3):
        # FFHQ's own alignment is not exactly the 5-point template: a few pixels apart at most.
        found = detect_faces(reframed[i]["hq"].unsqueeze(0), "dlib", upsample=1)
        assert found and np.abs(found[0].landmarks[:2] - eyes).max() < 6
        assert np.abs(reframed[i]["landmarks"].numpy() - template_points("utkface", 128)).max() < 1e-3


def test_stored_landmarks_align_like_the_template_and_missing_ones_resize(faces_dir, tmp_path):
    import json

    from priorface.inference.face_align import (
        estimate_similarity,
        mirror_landmarks,
        template_points,
        warp_affine,
    )
    from priorface.inference.images import load_image_file

    # Landmarks of a face rotated by 10 degrees about the image centre: alignment must undo that.
    theta = np.deg2rad(10.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = (template_points("utkface", 40) - 20) @ rot.T + 20
    stored = {"20_0_0_2017.jpg": points.tolist(), "21_1_1_2017.jpg": None}
    (tmp_path / "lm.json").write_text(json.dumps(stored))
    cfg = FaceDatasetConfig(
        hq_dirs=[str(faces_dir)],
        size=32,
        degradation="bicubic_x4",
        split="all",
        align="utkface",
        landmarks_json=str(tmp_path / "lm.json"),
    )
    ds = FaceDataset(cfg)
    names = [rel for _, rel in ds.files]
    image = load_image_file(faces_dir / "20_0_0_2017.jpg")[None]
    expected = warp_affine(image, estimate_similarity(points, template_points("utkface", 32)), (32, 32))
    assert (ds[names.index("20_0_0_2017.jpg")]["hq"] - expected[0]).abs().max() < 1e-5
    unaligned = torch.nn.functional.interpolate(
        load_image_file(faces_dir / "21_1_1_2017.jpg")[None], size=(32, 32), mode="bicubic", antialias=True
    ).clamp(0, 1)
    assert torch.allclose(ds[names.index("21_1_1_2017.jpg")]["hq"], unaligned[0], atol=1e-5)
    assert not torch.allclose(
        ds[names.index("20_0_0_2017.jpg")]["hq"], ds0_item(faces_dir, "20_0_0_2017.jpg")
    )
    # The points travel with the face: on the template after alignment, unknown (NaN) when resized.
    assert torch.allclose(
        ds[names.index("20_0_0_2017.jpg")]["landmarks"],
        torch.from_numpy(template_points("utkface", 32)).float(),
        atol=1e-4,
    )
    assert torch.isnan(ds[names.index("21_1_1_2017.jpg")]["landmarks"]).all()
    # Without alignment they are scaled with the resize (pixel centres) and mirrored with a flip.
    plain = FaceDataset(FaceDatasetConfig(**{**vars(cfg), "align": "none", "hflip": True, "split": "all"}))
    index = names.index("20_0_0_2017.jpg")
    scaled = torch.from_numpy((points + 0.5) * (32 / 40) - 0.5).float()
    seen = set()
    for epoch in range(8):  # seeded coins: both outcomes occur within a few epochs
        plain.set_epoch(epoch)
        item = plain[index]
        flipped = '"hflip": true' in item["degradation"]
        seen.add(flipped)
        want = mirror_landmarks(scaled, 32) if flipped else scaled
        assert torch.allclose(item["landmarks"], want, atol=1e-5)
    assert seen == {True, False}


def ds0_item(faces_dir, name):
    ds = FaceDataset(
        FaceDatasetConfig(hq_dirs=[str(faces_dir)], size=32, degradation="bicubic_x4", split="all")
    )
    return ds[[rel for _, rel in ds.files].index(name)]["hq"]


@pytest.mark.parametrize("degradation", ["bicubic_x4", "blind"])
def test_cached_items_equal_uncached_ones_in_every_epoch(faces_dir, degradation):
    """cache_items keeps the decoded HQ (and a bicubic LQ); flips and random LQ draws stay per epoch."""
    cfg = dict(hq_dirs=[str(faces_dir)], size=32, degradation=degradation, split="all", hflip=True)
    plain = FaceDataset(FaceDatasetConfig(**cfg))
    cached = FaceDataset(FaceDatasetConfig(**cfg, cache_items=True))
    cached.prefill(workers=2)
    assert len(cached._cache) == len(cached)
    flipped = 0
    for epoch in (0, 1, 2):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["hq"], b["hq"]) and torch.equal(a["lq"], b["lq"])
            assert a["degradation"] == b["degradation"] and a["name"] == b["name"]
            assert torch.equal(a["landmarks"].isnan(), b["landmarks"].isnan())
            flipped += '"hflip": true' in b["degradation"]
    assert 0 < flipped < 3 * len(plain)  # flips were drawn, and the cache kept the unflipped face
    kept_lq = [entry[1] is not None for entry in cached._cache.values()]
    assert all(kept_lq) if degradation == "bicubic_x4" else not any(kept_lq)


def test_prefill_does_nothing_without_cache_items(faces_dir):
    ds = FaceDataset(FaceDatasetConfig(hq_dirs=[str(faces_dir)], size=32, split="all"))
    ds.prefill()
    ds[0]
    assert ds._cache == {}
