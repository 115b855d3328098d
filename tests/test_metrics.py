"""Metrics: PSNR/SSIM against scikit-image, LPIPS round trip, identity on LFW, evaluation, nodes."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from priorface.inference.metrics.evaluate import COLUMNS, add_evaluate_parser, evaluate_folders
from priorface.inference.metrics.grid import label_band_height, make_grid
from priorface.inference.metrics.identity import roc_auc
from priorface.inference.metrics.psnr_ssim import psnr, rgb_to_y, ssim
from priorface.inference.model_files import headless_locator

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEV_PAIRS = SHARED / "data/faces/dev/pairs"
LFW = SHARED / "data/faces/lfw-identity"


def _skimage_metrics():
    return pytest.importorskip("skimage.metrics")


def _sk_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return _skimage_metrics().peak_signal_noise_ratio(a, b, data_range=255)


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    if a.ndim == 3:
        kwargs["channel_axis"] = 2
    return _skimage_metrics().structural_similarity(a, b, **kwargs)


def _y_numpy(rgb255: np.ndarray) -> np.ndarray:
    # MATLAB rgb2ycbcr luma, written out independently of the library: inputs on 0..255.
    r, g, b = (rgb255[..., i] / 255.0 for i in range(3))
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def _to_bchw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64) / 255.0).permute(2, 0, 1).unsqueeze(0)


def _read_u8(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


# ---------------------------------------------------------------- PSNR / SSIM


@pytest.mark.parametrize("name", ["ffhq_00000.png", "ffhq_00001.png", "ffhq_00002.png", "ffhq_00003.png"])
def test_psnr_ssim_match_skimage_on_real_pairs(name):
    if not (DEV_PAIRS / "hq" / name).is_file():
        pytest.skip(f"{DEV_PAIRS} not available")
    hq, lq = _read_u8(DEV_PAIRS / "hq" / name), _read_u8(DEV_PAIRS / "lq" / name)
    a, b = _to_bchw(lq), _to_bchw(hq)
    assert float(psnr(a, b)) == pytest.approx(_sk_psnr(lq, hq), abs=1e-4)
    assert float(ssim(a, b)) == pytest.approx(_sk_ssim(lq, hq), abs=1e-4)
    ylq, yhq = _y_numpy(lq), _y_numpy(hq)
    assert float(psnr(a, b, y_channel=True)) == pytest.approx(_sk_psnr(ylq, yhq), abs=1e-4)
    c = 4
    assert float(ssim(a, b, crop_border=c, y_channel=True)) == pytest.approx(
        _sk_ssim(ylq[c:-c, c:-c], yhq[c:-c, c:-c]), abs=1e-4
    )


def test_psnr_ssim_on_unquantised_batches_match_skimage():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 40, 36, generator=gen, dtype=torch.float64)
    b = (a + 0.05 * torch.randn(2, 3, 40, 36, generator=gen, dtype=torch.float64)).clamp(0, 1)
    p, s = psnr(a, b, crop_border=2), ssim(a, b, crop_border=2)
    assert p.shape == s.shape == (2,)
    for i in range(2):
        x = a[i].permute(1, 2, 0).numpy()[2:-2, 2:-2] * 255
        y = b[i].permute(1, 2, 0).numpy()[2:-2, 2:-2] * 255
        assert float(p[i]) == pytest.approx(_sk_psnr(x, y), abs=1e-6)
        assert float(s[i]) == pytest.approx(_sk_ssim(x, y), abs=1e-6)


def test_known_values_and_errors():
    white, black = torch.ones(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    assert torch.allclose(rgb_to_y(white.double()), torch.full((1, 1, 16, 16), 235.0, dtype=torch.float64))
    assert torch.allclose(rgb_to_y(black.double()), torch.full((1, 1, 16, 16), 16.0, dtype=torch.float64))
    x = torch.full((1, 3, 16, 16), 100 / 255, dtype=torch.float64)
    assert float(psnr(x, x + 1 / 255)) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE of exactly 1
    assert math.isinf(float(psnr(x, x))) and float(ssim(x, x)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\) vs \(1, 3, 16, 12\)"):
        psnr(x, x[..., :12])
    with pytest.raises(ValueError, match="crop_border 8"):
        ssim(x, x, crop_border=8)


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random-weight LPIPS saved as the two real files (torchvision and LPIPS key names)."""
    from priorface.models.lpips_vgg import LPIPSVGG

    torch.manual_seed(0)
    model = LPIPSVGG().eval()
    with torch.no_grad():
        for k in range(5):  # trained LPIPS heads are non-negative; keep that property
            head = getattr(model, f"lin{k}").model[1].weight
            head.copy_(head.abs())
    folder = tmp_path_factory.mktemp("models") / "priorface" / "metrics"
    folder.mkdir(parents=True)
    sd = model.state_dict()
    backbone = {k: v for k, v in sd.items() if k.startswith("features.")}
    # The real file also holds the classifier (about 480 MB); small stand-ins keep its key names.
    backbone.update({f"classifier.{i}.{p}": torch.zeros(2) for i in (0, 3, 6) for p in ("weight", "bias")})
    # torchvision's vgg16-397923af.pth and LPIPS's vgg.pth predate the zip format: save them the old way.
    torch.save(backbone, folder / "vgg16-397923af.pth", _use_new_zipfile_serialization=False)
    torch.save(
        {k: v for k, v in sd.items() if k.startswith("lin")},
        folder / "vgg.pth",
        _use_new_zipfile_serialization=False,
    )
    return model, folder


def test_lpips_round_trip_and_properties(lpips_files):
    from priorface.inference.metrics.lpips import load_lpips, lpips_distance

    original, folder = lpips_files
    loaded = load_lpips(headless_locator(folder.parent.parent), cached=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 48, 48, generator=gen)
    noise = torch.randn(2, 3, 48, 48, generator=gen)
    y = (x + 0.1 * noise).clamp(0, 1)
    with torch.no_grad():
        assert torch.allclose(loaded(x, y), original(x, y), atol=1e-6)
    assert lpips_distance(loaded, x, x) == pytest.approx([0.0, 0.0], abs=1e-7)
    assert lpips_distance(loaded, x, y) == pytest.approx(lpips_distance(loaded, y, x), rel=1e-5)
    levels = [lpips_distance(loaded, x, (x + s * noise).clamp(0, 1))[0] for s in (0.02, 0.1, 0.3)]
    assert 0 < levels[0] < levels[1] < levels[2], levels


def test_lpips_missing_files_error_names_both(tmp_path, lpips_files):
    from priorface.inference.metrics.lpips import LPIPSWeightsMissing, load_lpips

    with pytest.raises(LPIPSWeightsMissing) as info:
        load_lpips(headless_locator(tmp_path))
    message = str(info.value)
    for expected in ("vgg.pth", "vgg16-397923af.pth", "models/priorface/metrics", "never downloads"):
        assert expected in message
    only_linear = tmp_path / "one" / "priorface" / "metrics"
    only_linear.mkdir(parents=True)
    (only_linear / "vgg.pth").write_bytes((lpips_files[1] / "vgg.pth").read_bytes())
    with pytest.raises(LPIPSWeightsMissing, match="vgg16-397923af.pth is missing"):
        load_lpips(headless_locator(tmp_path / "one"))


def test_lpips_reports_wrong_keys(tmp_path, lpips_files):
    from priorface.inference.metrics.lpips import load_lpips_files
    from priorface.models.checkpoint import KeyMismatchError

    bad = {"lin0.model.1.weight": torch.zeros(1, 64, 1, 1), "lin9.weight": torch.zeros(1)}
    torch.save(bad, tmp_path / "vgg.pth")
    with pytest.raises(KeyMismatchError, match=r"lin1\.model\.1\.weight.*|lin9\.weight"):
        load_lpips_files(tmp_path / "vgg.pth", lpips_files[1] / "vgg16-397923af.pth")


# ---------------------------------------------------------------- identity


def test_roc_auc_known_values():
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert roc_auc([1, 0], [1.0, 0.0]) == 1.0 and roc_auc([1, 0], [0.0, 1.0]) == 0.0
    assert roc_auc([1, 0, 0], [0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.1, 0.2])


def _lfw_pairs(limit: int) -> list[tuple[str, str, int]]:
    with open(LFW / "pairs.csv", newline="") as f:
        rows = [(r["image_a"], r["image_b"], int(r["same_person"])) for r in csv.DictReader(f)]
    return [r for r in rows if r[2]][:limit] + [r for r in rows if not r[2]][:limit]


@pytest.mark.slow
def test_identity_separates_lfw_pairs():
    pytest.importorskip("dlib")
    if not (LFW / "pairs.csv").is_file():
        pytest.skip(f"{LFW} not available")
    from priorface.inference.metrics.identity import descriptor_distance, embed_face

    cache = {}

    def embed(name):
        if name not in cache:
            cache[name] = embed_face(np.asarray(Image.open(LFW / name).convert("RGB")))
        return cache[name]

    pairs = _lfw_pairs(12)
    distances = [descriptor_distance(embed(a), embed(b)) for a, b, _ in pairs]
    labels = [same for _, _, same in pairs]
    assert roc_auc(labels, -np.array(distances)) > 0.95


def test_identity_falls_back_to_whole_image():
    pytest.importorskip("dlib")
    from priorface.inference.metrics.identity import embed_face, identity_distance

    noise = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0))
    emb = embed_face(noise)
    assert not emb.detected and emb.descriptor.shape == (128,) and np.isfinite(emb.descriptor).all()
    assert identity_distance(noise, noise)[0] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- grid and evaluation


def test_make_grid_layout():
    a = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0))
    b = Image.fromarray(np.full((10, 12, 3), 200, np.uint8))
    grid = make_grid([[a, b], [b]], gap=4)
    assert grid.size == (2 * 30 + 3 * 4, 2 * (20 + 4) + 4)
    pixels = np.asarray(grid)
    expected_a = (a * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(pixels[4:24, 4:34], expected_a)
    assert np.array_equal(pixels[28:38, 4:16], np.asarray(b))
    with pytest.raises(ValueError, match="2 labels for 1 rows"):
        make_grid([[a]], labels=["x", "y"])


def _smooth_image(seed: int, h: int, w: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=gen)
    t = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """refs a,b,c; results a,b (noisy), c at a different size, d without a reference."""
    res, ref = tmp_path / "results", tmp_path / "refs"
    res.mkdir(), ref.mkdir()
    rng = np.random.default_rng(0)
    for i, stem in enumerate("abc"):
        clean = _smooth_image(i, 64, 64)
        Image.fromarray(clean).save(ref / f"{stem}.png")
        noisy = np.clip(clean.astype(int) + rng.integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
        out = noisy if stem != "c" else noisy[:48, :56]
        Image.fromarray(out).save(res / f"{stem}.png")
    Image.fromarray(_smooth_image(9, 64, 64)).save(res / "d.png")
    return res, ref


def test_evaluate_folders_writes_csv_and_grid(folders, tmp_path):
    res, ref = folders
    out_csv, grid_path = tmp_path / "out" / "metrics.csv", tmp_path / "grid.png"
    metrics = ("psnr", "ssim", "psnr_y", "ssim_y")
    evaluate_folders(
        res, ref, out_csv, grid_path=grid_path, metrics=metrics, locator=headless_locator(tmp_path)
    )
    with open(out_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = {r["file"]: r for r in reader}
    assert list(rows) == ["a.png", "b.png", "c.png", "d.png", "mean"]
    for stem in "ab":
        x, y = _read_u8(res / f"{stem}.png"), _read_u8(ref / f"{stem}.png")
        assert float(rows[f"{stem}.png"]["psnr"]) == pytest.approx(_sk_psnr(x, y), abs=1e-5)
        assert float(rows[f"{stem}.png"]["ssim_y"]) == pytest.approx(
            _sk_ssim(_y_numpy(x), _y_numpy(y)), abs=1e-5
        )
        assert rows[f"{stem}.png"]["lpips"] == rows[f"{stem}.png"]["identity_distance"] == ""
    assert (
        "56x48" in rows["c.png"]["error"]
        and "64x64" in rows["c.png"]["error"]
        and rows["c.png"]["psnr"] == ""
    )
    assert "no reference" in rows["d.png"]["error"]
    mean_psnr = (float(rows["a.png"]["psnr"]) + float(rows["b.png"]["psnr"])) / 2
    assert float(rows["mean"]["psnr"]) == pytest.approx(mean_psnr, abs=1e-5)
    assert rows["mean"]["error"] == "2 of 4 file(s) failed"
    # Grid: rows a, b, c (c's pair was readable); cells of the largest image, labels of two lines.
    grid = np.asarray(Image.open(grid_path))
    band, gap = label_band_height(["1\n2"], ImageFont.load_default()), 4
    assert grid.shape[0] == 3 * (band + 64 + gap) + gap and grid.shape[1] >= 2 * 64 + 3 * gap
    top = gap + band
    assert np.array_equal(grid[top : top + 64, gap : gap + 64], _read_u8(ref / "a.png").astype(np.uint8))
    assert np.array_equal(
        grid[top : top + 64, 2 * gap + 64 : 2 * gap + 128], _read_u8(res / "a.png").astype(np.uint8)
    )


def test_evaluate_cli_and_lpips_column(folders, tmp_path, lpips_files, capsys):
    res, ref = folders
    (res / "c.png").unlink()
    (res / "d.png").unlink()
    (ref / "c.png").unlink()
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    models_dir = lpips_files[1].parent.parent
    out_csv = tmp_path / "m.csv"
    args = parser.parse_args(
        [
            "evaluate",
            str(res),
            str(ref),
            "--csv",
            str(out_csv),
            "--metrics",
            "psnr,lpips",
            "--models-dir",
            str(models_dir),
        ]
    )
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["a.png", "b.png", "mean"]
    assert all(float(r["lpips"]) > 0 for r in rows) and rows[0]["ssim"] == ""
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_folders(res, ref, out_csv, metrics=("fid",))


# ---------------------------------------------------------------- nodes


def test_image_metrics_node(comfy_env, check_outputs, lpips_files):
    from priorface.nodes.metric_nodes import ImageMetricsNode

    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(1, 32, 40, 3, generator=gen)
    restored = (reference + 0.05 * torch.randn(2, 32, 40, 3, generator=gen)).clamp(0, 1)
    table, payload, mean_psnr, mean_ssim = check_outputs(
        ImageMetricsNode, ImageMetricsNode().measure(restored, reference, 2)
    )
    a, b = restored.permute(0, 3, 1, 2), reference.permute(0, 3, 1, 2).expand(2, -1, -1, -1)
    assert mean_psnr == pytest.approx(float(psnr(a, b, 2).mean()), abs=1e-9)
    assert mean_ssim == pytest.approx(float(ssim(a, b, 2).mean()), abs=1e-9)
    data = json.loads(payload)
    assert len(data["images"]) == 2 and data["images"][1]["ssim_y"] == pytest.approx(
        float(ssim(a, b, 2, True)[1])
    )
    assert table.count("\n") == 2 and "PSNR-Y" in table

    with pytest.raises(ValueError, match=r"40x32.*36x32"):
        ImageMetricsNode().measure(restored, reference[:, :, :36], 0)
    with pytest.raises(ValueError, match="2 images and reference has 3"):
        ImageMetricsNode().measure(restored, reference.expand(3, -1, -1, -1), 0)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        ImageMetricsNode().measure(restored, reference, 0, lpips=True)
    (comfy_env.models_dir / "priorface").mkdir(parents=True, exist_ok=True)
    (comfy_env.models_dir / "priorface" / "metrics").symlink_to(lpips_files[1], target_is_directory=True)
    _, payload, _, _ = check_outputs(
        ImageMetricsNode, ImageMetricsNode().measure(restored, reference, 0, lpips=True)
    )
    with torch.no_grad():
        expected = lpips_files[0](a.float(), b.float())
    assert [img["lpips"] for img in json.loads(payload)["images"]] == pytest.approx(
        expected.tolist(), abs=1e-6
    )


def test_identity_distance_node(comfy_env, check_outputs):
    pytest.importorskip("dlib")
    if not (LFW / "pairs.csv").is_file():
        pytest.skip(f"{LFW} not available")
    from priorface.nodes.metric_nodes import IdentityDistanceNode

    def load(name):
        return (
            torch.from_numpy(np.asarray(Image.open(LFW / name).convert("RGB")).copy()).float().unsqueeze(0)
            / 255
        )

    a = torch.cat([load("Abdullah_Gul_0001.jpg"), load("Alec_Baldwin_0001.jpg")])
    b = load("Abdullah_Gul_0002.jpg")
    mean, report = check_outputs(IdentityDistanceNode, IdentityDistanceNode().measure(a, b, 0))
    lines = report.splitlines()
    same, different = (float(line.split()[1]) for line in lines[:2])
    assert same < 0.6 < different and mean == pytest.approx((same + different) / 2, abs=1e-3)
    assert "same person" in lines[0] and "different person" in lines[1]
    with pytest.raises(ValueError, match="2 images and image_b has 3"):
        IdentityDistanceNode().measure(a, torch.cat([b, b, b]), 0)


def test_frequency_bands_add_up_and_locate_the_error():
    from priorface.inference.metrics.frequency_bands import band_errors, band_split, low_pass

    g = torch.Generator().manual_seed(0)
    smooth = low_pass(torch.rand(2, 3, 16, 16, generator=g), 16)  # no detail: a 16-px picture
    smooth = torch.nn.functional.interpolate(smooth, size=(128, 128), mode="bicubic", align_corners=False)
    noise = torch.rand(2, 3, 128, 128, generator=g)
    bands = band_split(noise)
    assert list(bands) == ["<16", "16-32", "32-64", ">64"]
    assert torch.allclose(sum(bands.values()), noise.double(), atol=1e-12)
    top = {name: band_errors(x, x)[-1] for name, x in (("smooth", smooth), ("noise", noise))}
    assert top["smooth"]["energy"] < 1e-3 * top["noise"]["energy"]
    assert all(r["error"] == 0 for r in top.values())
    # Losing only the top octave puts (almost) all of the error in the top band.
    rows = band_errors(low_pass(noise, 64), noise)
    assert rows[-1]["error"] > 0.8 * rows[-1]["energy"]
    assert max(r["error"] for r in rows[:-1]) < 0.05 * rows[-1]["error"]
    with pytest.raises(ValueError, match="band sides"):
        band_split(noise, (16, 128))
    with pytest.raises(ValueError, match="shape"):
        band_errors(noise, smooth[..., :64, :64])
