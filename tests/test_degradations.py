"""Degradations: MATLAB bicubic against an independent loop and hand values, stage effects, seeding, node."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from priorface.inference.degradations import (
    BlindConfig,
    RealESRGANConfig,
    bicubic_degrade,
    bicubic_downsample,
    blind_degrade,
    degrade,
    imresize,
    kernels,
    modcrop,
    ops,
    realesrgan_degrade,
)

# ----------------------------------------------------------------- MATLAB bicubic reference (loops)


def _keys_cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def _mirror(j: int, n: int) -> int:
    """1-based symmetric index: 0 -> 1, -1 -> 2, n+1 -> n, n+2 -> n-1."""
    while j < 1 or j > n:
        j = 1 - j if j < 1 else 2 * n + 1 - j
    return j


def _axis_taps(n_in: int, scale: float) -> list[list[tuple[int, float]]]:
    """Per output pixel: (0-based input index, normalised weight), straight from MATLAB's definition."""
    n_out = math.ceil(n_in * scale)
    support = 2.0 / scale if scale < 1 else 2.0
    rows = []
    for i in range(1, n_out + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        taps = []
        for j in range(math.floor(u - support) - 1, math.ceil(u + support) + 2):
            d = u - j
            w = scale * _keys_cubic(scale * d) if scale < 1 else _keys_cubic(d)
            if w != 0.0:
                taps.append((_mirror(j, n_in) - 1, w))
        total = sum(w for _, w in taps)
        rows.append([(k, w / total) for k, w in taps])
    return rows


def _imresize_loop(img: np.ndarray, scale: float) -> np.ndarray:
    """2-D explicit double loop over output pixels and the product of both axes' taps."""
    rows, cols = _axis_taps(img.shape[0], scale), _axis_taps(img.shape[1], scale)
    out = np.zeros((len(rows), len(cols)))
    for i, rt in enumerate(rows):
        for k, ct in enumerate(cols):
            out[i, k] = sum(wr * wc * img[a, b] for a, wr in rt for b, wc in ct)
    return out


@pytest.mark.parametrize(("shape", "scale"), [((4, 4), 0.5), ((16, 12), 0.25), ((7, 9), 0.37), ((5, 6), 4.0)])
def test_imresize_matches_loop_reference(shape, scale):
    img = np.random.default_rng(1).random(shape).astype(np.float32)
    ours = imresize(torch.from_numpy(img)[None, None], scale)[0, 0].numpy()
    ref = _imresize_loop(img.astype(np.float64), scale)
    assert ours.shape == ref.shape == (math.ceil(shape[0] * scale), math.ceil(shape[1] * scale))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_imresize_hand_computed_values():
    # 1-D [1 2 3 4] halved: weights 0.5*cubic(0.5 d) on a symmetric-padded signal, worked out by hand.
    row = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert torch.allclose(
        imresize(row, 0.5)[0, 0, 0], torch.tensor([1.4609375, 3.5390625], dtype=torch.float64)
    )
    grid = torch.arange(1.0, 17.0, dtype=torch.float64).view(1, 1, 4, 4)
    expected = torch.tensor([[3.3046875, 5.3828125], [11.6171875, 13.6953125]], dtype=torch.float64)
    assert torch.allclose(imresize(grid, 0.5)[0, 0], expected)


def test_imresize_constant_and_ramp():
    const = torch.full((1, 3, 24, 20), 0.3)
    for scale in (0.25, 0.125, 4.0):
        assert torch.allclose(imresize(const, scale), torch.full_like(imresize(const, scale), 0.3), atol=1e-6)
    # Away from the borders a linear ramp is reproduced exactly: output i (1-based) samples u = 4i - 1.5.
    ramp = torch.arange(1.0, 65.0, dtype=torch.float64).view(1, 1, 64, 1).expand(1, 1, 64, 8)
    out = imresize(ramp, 0.25)[0, 0, :, 0]
    u = 4 * torch.arange(1, 17, dtype=torch.float64) - 1.5
    assert torch.allclose(out[3:-3], u[3:-3], atol=1e-9)


@pytest.mark.parametrize(("size", "scale"), [((8, 10), 4.0), ((32, 40), 0.25)])
def test_imresize_matches_pil_bicubic_inside(size, scale):
    # PIL's BICUBIC is the same a=-0.5 kernel (widened when shrinking) but renormalises at the edges.
    img = np.random.default_rng(2).random(size).astype(np.float32)
    out_w, out_h = round(size[1] * scale), round(size[0] * scale)
    pil = np.asarray(Image.fromarray(img, mode="F").resize((out_w, out_h), Image.BICUBIC))
    ours = imresize(torch.from_numpy(img)[None, None], scale)[0, 0].numpy()
    m = 8 if scale > 1 else 2
    np.testing.assert_allclose(ours[m:-m, m:-m], pil[m:-m, m:-m], atol=1e-5)
    assert np.abs(ours - pil).max() > 1e-4  # the border rules really differ


@pytest.mark.parametrize("scale", [4, 8, 16])
def test_bicubic_sizes_and_round_trip(scale):
    x = torch.rand(2, 3, 16 * 6, 16 * 5)
    lr, up = bicubic_degrade(x, scale)
    assert lr.shape == (2, 3, 96 // scale, 80 // scale) and up.shape == x.shape
    assert torch.equal(lr, bicubic_downsample(x, scale))
    assert bicubic_degrade(x, scale, upsample_back=False)[1] is None
    with pytest.raises(ValueError, match="not divisible"):
        bicubic_downsample(torch.rand(1, 3, 97, 80), scale)
    assert modcrop(torch.rand(1, 3, 97, 83), scale).shape[-2:] == (97 - 97 % scale, 83 - 83 % scale)
    with pytest.raises(ValueError, match="one of"):
        bicubic_downsample(x, 3)


# ------------------------------------------------------------------------------ kernels and stages


def test_kernels_normalised_and_match_references():
    g = cv2.getGaussianKernel(21, 2.0)
    np.testing.assert_allclose(kernels.gaussian_kernel(21, 2.0, 2.0), g @ g.T, atol=1e-12)
    iso = kernels.gaussian_kernel(15, 1.5, 1.5)
    np.testing.assert_allclose(kernels.generalized_gaussian_kernel(15, 1.5, 1.5, 0.3, 1.0), iso, atol=1e-12)
    aniso = kernels.gaussian_kernel(21, 3.0, 1.0, math.pi / 2)  # rotated 90 degrees: long axis vertical
    assert aniso[:, 10].sum() > aniso[10, :].sum()
    plateau = kernels.plateau_kernel(21, 2.0, 2.0, 0.0, 2.0)
    assert plateau[10, 10] == plateau.max() and np.isclose(plateau.sum(), 1.0)
    # The circular low-pass passes frequencies below its cutoff and removes those above.
    sinc = kernels.sinc_kernel(21, math.pi / 3, pad_to=31)
    assert sinc.shape == (31, 31) and np.isclose(sinc.sum(), 1.0)
    response = np.abs(np.fft.fft2(sinc, s=(256, 256)))
    assert response[0, 10] > 0.95 and response[0, 128] < 0.05  # omega 0.25 rad vs pi


def _high_freq_energy(img: np.ndarray) -> float:
    spec = np.abs(np.fft.fftshift(np.fft.fft2(img[..., 0]))) ** 2
    h, w = spec.shape
    yy, xx = np.mgrid[:h, :w]
    return float(spec[np.hypot(yy - h / 2, xx - w / 2) > h / 4].sum())


def test_blur_reduces_high_frequency_energy():
    img = np.random.default_rng(3).random((64, 64, 3)).astype(np.float32)
    kernel, params = kernels.random_mixed_kernel(np.random.default_rng(0), ("iso",), (1.0,), 21, (2.0, 3.0))
    assert params["type"] == "iso" and 2.0 <= params["sigma_x"] <= 3.0
    assert _high_freq_energy(ops.filter2d(img, kernel)) < 0.01 * _high_freq_energy(img)


def _blockiness(img: np.ndarray) -> float:
    """Mean |horizontal step| across 8x8 block boundaries divided by the mean step inside blocks."""
    d = np.abs(np.diff(img.mean(axis=2), axis=1))
    boundary = (np.arange(d.shape[1]) % 8) == 7
    return float(d[:, boundary].mean() / d[:, ~boundary].mean())


def test_jpeg_creates_8x8_block_structure():
    yy, xx = np.mgrid[:128, :128] / 128.0
    smooth = np.stack([xx, yy, (xx + yy) / 2], axis=-1)
    img = np.clip(smooth + np.random.default_rng(4).normal(0, 0.02, smooth.shape), 0, 1).astype(np.float32)
    assert abs(_blockiness(img) - 1.0) < 0.1
    assert _blockiness(ops.jpeg(img, 20)) > 1.5
    assert np.abs(ops.jpeg(img, 100) - img).mean() < np.abs(ops.jpeg(img, 20) - img).mean()
    with pytest.raises(ValueError, match="quality"):
        ops.jpeg(img, 101)


def test_noise_std_is_as_drawn():
    flat = np.full((128, 128, 3), 0.5, dtype=np.float32)
    noisy = ops.add_gaussian_noise(flat, np.random.default_rng(5), 12.0)
    assert abs((noisy - flat).std() - 12.0 / 255) < 0.03 * 12.0 / 255
    gray = ops.add_gaussian_noise(flat, np.random.default_rng(5), 12.0, gray=True)
    assert np.array_equal(gray[..., 0], gray[..., 2]) and not np.array_equal(noisy[..., 0], noisy[..., 2])
    # Poisson: 256 distinct levels -> 256 counts per unit, so Var = v / 256 * scale^2 at level v.
    img = np.full((256, 256, 3), 128 / 255, dtype=np.float32)
    img[0, :, :] = (np.arange(256) / 255.0)[:, None]
    out = ops.add_poisson_noise(img, np.random.default_rng(6), scale=2.0)
    expected = math.sqrt(128 / 255 / 256) * 2.0
    assert abs((out - img)[1:].std() - expected) < 0.03 * expected


def test_usm_sharpens_edges_and_leaves_flat_areas():
    img = np.full((64, 64, 3), 0.3, dtype=np.float32)
    img[:, 32:] = 0.7
    img = ops.filter2d(img, kernels.gaussian_kernel(9, 1.5, 1.5))  # a soft edge
    sharp = ops.usm_sharpen(img)
    assert np.abs(np.diff(sharp[32, :, 0])).max() > 1.2 * np.abs(np.diff(img[32, :, 0])).max()
    assert np.allclose(sharp[:, :5], img[:, :5], atol=1e-6)  # far from the edge nothing changes


# -------------------------------------------------------------------------- pipelines and seeding


@pytest.mark.parametrize("mode", ["bicubic_x4", "bicubic_x8", "bicubic_x16", "blind", "realesrgan"])
def test_same_seed_same_output_other_seed_differs(mode):
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    a, log_a = degrade(x, mode, seed=11)
    b, log_b = degrade(x, mode, seed=11)
    assert torch.equal(a, b) and log_a == log_b and a.shape == x.shape
    c, log_c = degrade(x, mode, seed=12)
    if mode.startswith("bicubic"):
        assert torch.equal(a, c)  # deterministic, the seed plays no part
    else:
        assert not torch.equal(a, c) and log_a["images"] != log_c["images"]
        # Image i uses seed + i: image 1 with seed 11 equals image 0 with seed 12.
        single, _ = degrade(x[1:], mode, seed=12)
        assert torch.equal(a[1:], single)
    json.dumps(log_a)  # everything drawn is plain JSON


def test_blind_stages_and_parameters():
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    for seed in range(6):
        out, (p,) = blind_degrade(x, seed)
        assert (
            out.shape == x.shape and p["blur"]["size"] in (39, 41) and p["blur"]["type"] in ("iso", "aniso")
        )
        assert 0.1 <= p["blur"]["sigma_x"] <= 10 and 0.8 <= p["downsample"] <= 8
        assert 0 <= p["noise_sigma_255"] <= 20 and 60 <= p["jpeg_quality"] <= 100
        assert p["small_size"] == [max(1, int(96 // p["downsample"])), max(1, int(80 // p["downsample"]))]
        assert torch.equal((out * 255).round() / 255, out)  # quantised to 8 bit
        lr, (q,) = blind_degrade(x, seed, BlindConfig(resize_back=False))
        assert list(lr.shape[-2:]) == q["small_size"]
    out, (p,) = blind_degrade(x, 0, BlindConfig(gray_prob=1.0, haze_prob=1.0))
    assert p["gray"] and torch.equal(out[:, 0], out[:, 1]) and p["haze_alpha"] is not None
    assert out.mean() > blind_degrade(x, 0, BlindConfig(haze_prob=0.0))[0].mean()  # haze lifts toward white
    # Without the resize back each image keeps its own drawn size, so a mixed batch is an error.
    sizes = [blind_degrade(x, s, BlindConfig(resize_back=False))[1][0]["small_size"] for s in range(4)]
    seed = next(s for s in range(3) if sizes[s] != sizes[s + 1])
    with pytest.raises(ValueError, match="different sizes"):
        degrade(x.expand(2, -1, -1, -1), "blind", seed=seed, output_size="lr")


def test_realesrgan_sizes_and_parameter_ranges():
    x = torch.rand(2, 3, 70, 66, generator=torch.Generator().manual_seed(2))
    out, params = realesrgan_degrade(x, seed=3)
    assert out.shape == (2, 3, 17, 16)  # floor(H / 4), floor(W / 4), as Real-ESRGAN's ori_h // scale
    assert degrade(x, "realesrgan", seed=3)[0].shape == x.shape
    for seed in range(8):
        (p,) = realesrgan_degrade(x[:1], seed)[1]
        assert p["blur1"]["size"] in range(7, 22, 2) and 30 <= p["jpeg1"] <= 95 and 30 <= p["jpeg2"] <= 95
        lo, hi = (1.0, 1.5) if p["resize1"]["type"] == "up" else (0.15, 1.0)
        assert lo <= p["resize1"]["scale"] <= hi and p["resize1"]["mode"] in ("area", "bilinear", "bicubic")
        n = p["noise2"]
        assert (1 <= n["sigma_255"] <= 25) if n["type"] == "gaussian" else (0.05 <= n["scale"] <= 2.5)
    with pytest.raises(ValueError, match="smaller than the scale"):
        realesrgan_degrade(torch.rand(1, 3, 3, 8), 0)


def test_realesrgan_without_random_stages_is_a_plain_resize():
    # Switch every random stage off (no blur, keep size, zero noise, JPEG at 100, no sinc): what is
    # left is the second-order resize straight to the LR size (the final resize is then 16 -> 16),
    # so the result must match F.interpolate with the logged mode, and not the other modes.
    cfg = RealESRGANConfig(
        use_usm=False, kernel_types=("iso",), kernel_probs=(1.0,), sinc_prob=0.0, blur_sigma=(1e-3, 1e-3),
        resize_prob=(0, 0, 1), gaussian_noise_prob=1.0, noise_range=(0, 0), jpeg_range=(100, 100),
        second_blur_prob=0.0, resize_prob2=(0, 0, 1), gaussian_noise_prob2=1.0, noise_range2=(0, 0),
        jpeg_range2=(100, 100), final_sinc_prob=0.0,
    )  # fmt: skip
    # Gray 8-bit texture: no chroma for JPEG's 4:2:0 subsampling to lose, luma kept to +-1 level at q100.
    gray = torch.randint(0, 256, (1, 1, 64, 64), generator=torch.Generator().manual_seed(3)) / 255.0
    x = gray.expand(1, 3, 64, 64)
    for seed in range(3):
        out, (p,) = realesrgan_degrade(x, seed, cfg)
        assert p["resize1"]["type"] == p["resize2"]["type"] == "keep" and p["blur2"] is None
        errors = {}
        for mode in ("area", "bilinear", "bicubic"):
            kwargs = {} if mode == "area" else {"align_corners": False}
            ref = torch.nn.functional.interpolate(x, size=(16, 16), mode=mode, **kwargs).clamp(0, 1)
            errors[mode] = float((out - ref).abs().mean() * 255)
        used = p["resize2"]["mode"]
        assert errors[used] < 1.0 and all(e > 10 for m, e in errors.items() if m != used), errors


def test_bad_arguments_are_value_errors():
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="mode"):
        degrade(x, "nearest")
    with pytest.raises(ValueError, match="seed"):
        degrade(x, "blind", seed=-1)
    with pytest.raises(ValueError, match="RGB"):
        degrade(torch.rand(1, 1, 32, 32), "realesrgan")
    with pytest.raises(ValueError, match="haze_prob"):
        BlindConfig(haze_prob=2.0)


# ------------------------------------------------------------------------------------------- node


@pytest.mark.parametrize(
    ("mode", "output_size", "shape"),
    [("bicubic x8", "low resolution", (2, 8, 6, 3)), ("blind (GFPGAN)", "input size", (2, 64, 48, 3)),
     ("real-esrgan x4", "low resolution", (2, 16, 12, 3)), ("bicubic x16", "input size", (2, 64, 48, 3))],
)  # fmt: skip
def test_node_outputs(comfy_env, check_outputs, mode, output_size, shape):
    from priorface.nodes.degradation_nodes import DegradeNode

    image = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(4))
    node = DegradeNode()
    out, text = check_outputs(DegradeNode, node.degrade(image, mode, 0xFFFFFFFFFFFFFFFF, output_size))
    assert out.shape == shape
    log = json.loads(text)
    assert log["seed"] == 0xFFFFFFFFFFFFFFFF
    again, _ = node.degrade(image, mode, 0xFFFFFFFFFFFFFFFF, output_size)
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="mode"):
        node.degrade(image, "bogus", 0, output_size)
