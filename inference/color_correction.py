"""Colour correction of a restored image towards a reference (usually the degraded input).

Restoration networks, diffusion ones especially, drift in colour. Two fixes, both on BCHW float
tensors in 0..1:

- AdaIN: give each channel of the restored image the reference's mean and standard deviation.
- Wavelet: keep the restored image's high frequencies (detail) and take the low frequencies
  (colour, shading) from the reference. The split is an a-trous ("with holes") decomposition:
  a 3x3 binomial blur applied repeatedly with dilation 1, 2, 4, ...; what each blur removes is a
  detail band, what is left after the last one is the low-pass residual. The same idea as the
  wavelet colour fix used by StableSR and XPSR, written here from the description.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_CORRECTIONS = ("none", "adain", "wavelet")

# Binomial [1, 2, 1] / 4 in both directions: the smallest smoothing kernel whose dilated repeats
# give an a-trous pyramid; each level roughly halves the remaining bandwidth.
_BINOMIAL = torch.tensor([1.0, 2.0, 1.0]) / 4.0


def _check_pair(image: torch.Tensor, reference: torch.Tensor) -> None:
    if image.dim() != 4 or reference.dim() != 4:
        raise ValueError(
            f"expected BCHW tensors, got image {tuple(image.shape)} and reference {tuple(reference.shape)}"
        )
    if reference.shape[1] != image.shape[1]:
        raise ValueError(f"channel counts differ: image {image.shape[1]}, reference {reference.shape[1]}")
    if reference.shape[0] not in (1, image.shape[0]):
        raise ValueError(
            f"reference batch {reference.shape[0]} does not match image batch {image.shape[0]} "
            f"(expected 1 or {image.shape[0]})"
        )


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of ``image`` replaced by those of ``reference`` (any spatial size)."""
    _check_pair(image, reference)
    image, reference = image.float(), reference.to(image.device, torch.float32)
    mean_i = image.mean(dim=(2, 3), keepdim=True)
    std_i = image.std(dim=(2, 3), keepdim=True, unbiased=False)
    mean_r = reference.mean(dim=(2, 3), keepdim=True)
    std_r = reference.std(dim=(2, 3), keepdim=True, unbiased=False)
    out = (image - mean_i) / (std_i + eps) * std_r + mean_r
    return out.clamp(0.0, 1.0)


def _atrous_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    c = x.shape[1]
    k = _BINOMIAL.to(x.device, x.dtype)
    kernel = (k[:, None] * k[None, :]).expand(c, 1, 3, 3).contiguous()
    # Replicate padding: a zero border would darken the low band along the edges.
    padded = F.pad(x, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(padded, kernel, dilation=dilation, groups=c)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split BCHW ``x`` into (high, low) with ``high + low == x``, by ``levels`` a-trous blurs."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    low = x
    high = torch.zeros_like(x)
    for i in range(levels):
        blurred = _atrous_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``image`` plus low frequencies of ``reference`` (resized to match)."""
    _check_pair(image, reference)
    image = image.float()
    reference = reference.to(image.device, torch.float32)
    if reference.shape[-2:] != image.shape[-2:]:
        reference = F.interpolate(
            reference, size=image.shape[-2:], mode="bicubic", align_corners=False, antialias=True
        )
    if reference.shape[0] != image.shape[0]:
        reference = reference.expand(image.shape[0], -1, -1, -1)
    high, _ = wavelet_decompose(image, levels)
    _, low = wavelet_decompose(reference, levels)
    return (high + low).clamp(0.0, 1.0)


def apply_color_correction(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch on ``method`` ("none", "adain" or "wavelet")."""
    if method == "none":
        return image
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    raise ValueError(f"unknown color correction {method!r}; expected one of {', '.join(COLOR_CORRECTIONS)}")
