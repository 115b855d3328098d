"""PSNR and SSIM as super-resolution papers report them (BasicSR/MATLAB conventions).

Inputs are BCHW float tensors in [0, 1]; values are computed in float64 on the 8-bit scale
(data range 255), optionally on the ITU-R BT.601 luma (Y) channel and with ``crop_border``
pixels removed from every side. SSIM uses the 11x11 Gaussian window (sigma 1.5), K1=0.01,
K2=0.03 and averages the map over the "valid" region only, which matches
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`` and BasicSR's ``calculate_ssim``.
"""

from __future__ import annotations

import math

import torch

DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# BT.601 luma for RGB in [0, 1] -> Y in [16, 235] (MATLAB rgb2ycbcr, BasicSR to_y_channel).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def _prepare(
    a: torch.Tensor, b: torch.Tensor, crop_border: int, y_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, crop borders, move to float64 on the 0..255 scale (Y channel if asked)."""
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"expected BCHW tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} (expected identical BCHW shapes)"
        )
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    h, w = a.shape[-2:]
    if crop_border * 2 >= min(h, w):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if y_channel:
        return rgb_to_y(a), rgb_to_y(b)
    return a * DATA_RANGE, b * DATA_RANGE


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """BCHW RGB in [0, 1] -> B1HW BT.601 luma on the 0..255 scale (16..235), like MATLAB."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_y expects [B,3,H,W], got {tuple(rgb.shape)}")
    weights = torch.tensor(_Y_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True) + _Y_OFFSET


def psnr(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image PSNR in dB (float64 ``[B]``); identical images give ``inf``."""
    x, y = _prepare(a, b, crop_border, y_channel)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def _gaussian_1d(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = SSIM_WINDOW // 2
    coords = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur_rows(t: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Valid 1-d weighted sum along H; in-place accumulation keeps float64 fast on CPU."""
    out_h = t.shape[-2] - len(weights) + 1
    out = t[..., :out_h, :] * weights[0]
    for k in range(1, len(weights)):
        out.add_(t[..., k : k + out_h, :], alpha=weights[k])
    return out


def _valid_blur(t: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local means over windows fully inside the image (skimage crops the same)."""
    g = [float(v) for v in _gaussian_1d(torch.float64, torch.device("cpu"))]
    # The 11x11 window is separable: one pass along H, then along W (transposed to stay contiguous).
    rows = _blur_rows(t, g).transpose(-1, -2).contiguous()
    return _blur_rows(rows, g).transpose(-1, -2)


def ssim(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image SSIM (float64 ``[B]``): the mean over channels of the valid-region SSIM map."""
    x, y = _prepare(a, b, crop_border, y_channel)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}"
        )
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    # One pass over the five statistics: means, second moments and the cross moment.
    mu_x, mu_y, xx, yy, xy = _valid_blur(torch.cat([x, y, x * x, y * y, x * y], dim=1)).chunk(5, dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


def psnr_ssim(
    a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False
) -> tuple[list[float], list[float]]:
    """PSNR and SSIM of each image pair as Python floats (convenience for tables and nodes)."""
    p = [float(v) for v in psnr(a, b, crop_border, y_channel)]
    s = [float(v) for v in ssim(a, b, crop_border, y_channel)]
    return p, s


def format_psnr(value: float) -> str:
    """Two-decimal dB string; identical images print as 'inf'."""
    return "inf" if math.isinf(value) else f"{value:.2f}"
