"""AdaIN and wavelet colour correction, checked against statistics and an independent low-pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from priorface.inference.color_correction import (
    adain_color_fix,
    apply_color_correction,
    wavelet_color_fix,
    wavelet_decompose,
)


def _gaussian_lowpass(x: torch.Tensor, sigma: float = 6.0) -> torch.Tensor:
    """Reference low-pass, independent of the a-trous code: a separable Gaussian, reflect padding."""
    r = math.ceil(4 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def _waves(size: int, freqs, amps, phase: float) -> torch.Tensor:
    """[1,3,size,size] sum of plane waves; freqs in cycles per pixel, one amplitude per channel."""
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.zeros(1, 3, size, size)
    for fx, fy in freqs:
        wave = torch.sin(2 * math.pi * (fx * x + fy * y) + phase)
        out += torch.tensor(amps).view(1, 3, 1, 1) * wave
    return out


def test_adain_matches_reference_statistics():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 40, 50) * 0.6 + 0.2
    reference = torch.randn(2, 3, 64, 64) * torch.tensor([0.05, 0.1, 0.08]).view(1, 3, 1, 1) + 0.5
    reference = reference.clamp(0, 1)
    out = adain_color_fix(image, reference)
    assert out.shape == image.shape
    torch.testing.assert_close(out.mean((2, 3)), reference.mean((2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        out.std((2, 3), unbiased=False), reference.std((2, 3), unbiased=False), atol=1e-4, rtol=0
    )
    # Structure is kept: per channel, output is an increasing affine function of the input.
    corr = torch.corrcoef(torch.stack([out[0, 0].flatten(), image[0, 0].flatten()]))[0, 1]
    assert corr > 0.9999


def test_adain_broadcasts_a_single_reference():
    image = torch.rand(3, 3, 8, 8)
    reference = torch.full((1, 3, 4, 4), 0.25)
    out = adain_color_fix(image, reference)
    torch.testing.assert_close(out, torch.full_like(out, 0.25), atol=1e-3, rtol=0)


def test_wavelet_bands_sum_to_the_input():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 37, 45)
    high, low = wavelet_decompose(x, levels=5)
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)
    assert low.std() < x.std() / 3  # the residual really is smooth


def test_wavelet_keeps_input_detail_and_reference_colours():
    size = 192
    low_in = 0.5 + _waves(size, [(1 / size, 0.0)], [0.15, -0.1, 0.05], 0.3)
    low_ref = 0.5 + _waves(size, [(0.0, 1 / size)], [-0.12, 0.08, 0.15], 1.1)
    high_in = _waves(size, [(0.27, 0.11), (0.05, 0.31)], [0.06, 0.06, 0.06], 0.0)
    high_ref = _waves(size, [(0.19, -0.23)], [0.08, 0.08, 0.08], 0.5)
    image, reference = low_in + high_in, low_ref + high_ref
    out = wavelet_color_fix(image, reference)

    inner = (..., slice(48, -48), slice(48, -48))  # away from the padded borders of both filters
    lp = {name: _gaussian_lowpass(t)[inner] for name, t in [("out", out), ("in", image), ("ref", reference)]}
    hp = {name: (t[inner] - lp[name]) for name, t in [("out", out), ("in", image), ("ref", reference)]}
    low_err = (lp["out"] - lp["ref"]).abs().mean()
    low_gap = (lp["in"] - lp["ref"]).abs().mean()
    high_err = (hp["out"] - hp["in"]).abs().mean()
    high_gap = (hp["ref"] - hp["in"]).abs().mean()
    print(
        f"wavelet: low-band error {low_err:.4f} (input vs reference {low_gap:.4f}); "
        f"high-band error {high_err:.4f} (reference vs input {high_gap:.4f})"
    )
    assert low_err < 0.1 * low_gap
    assert high_err < 0.1 * high_gap


def test_wavelet_resizes_a_smaller_reference():
    torch.manual_seed(2)
    image = 0.6 + 0.2 * (torch.rand(1, 3, 64, 64) - 0.5)
    reference = torch.full((1, 3, 16, 16), 0.3)
    out = wavelet_color_fix(image, reference)
    assert out.shape == image.shape
    assert abs(float(out.mean()) - 0.3) < 0.01  # the input's 0.6 is gone


def test_dispatch_and_errors():
    x = torch.rand(1, 3, 8, 8)
    assert apply_color_correction(x, x, "none") is x
    with pytest.raises(ValueError, match="unknown color correction 'lab'"):
        apply_color_correction(x, x, "lab")
    with pytest.raises(ValueError, match="channel"):
        adain_color_fix(x, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="batch 2"):
        wavelet_color_fix(torch.rand(3, 3, 8, 8), torch.rand(2, 3, 8, 8))
