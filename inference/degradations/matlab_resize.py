"""MATLAB-compatible bicubic ``imresize`` on BCHW tensors, and the bicubic SR degradation built on it.

Semantics follow MATLAB's ``imresize(..., 'bicubic')`` with its default antialiasing: the cubic
convolution kernel with a = -0.5, widened by 1/scale (and scaled by ``scale``) when shrinking,
output size ``ceil(in * scale)``, pixel-centre mapping ``u = x / scale + 0.5 * (1 - 1/scale)``
(1-based), weights normalised per output pixel and symmetric (edge-repeating) padding. Each axis
becomes one dense weight matrix, so a resize is two matrix products, done in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The scales of the LLV-FSR / SFMNet face SR settings (16x16 -> 128, 32 -> 256, ...).
SR_SCALES = (4, 8, 16)


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_weights(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """Dense ``[out_len, in_len]`` float64 matrix mapping one axis like MATLAB ``imresize``."""
    shrink = scale < 1 and antialias
    width = 4.0 / scale if shrink else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # output pixel centre in 1-based input coordinates
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices, may fall outside
    dist = u[:, None] - idx
    w = scale * cubic(scale * dist) if shrink else cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # Symmetric padding: 0 -> 1, -1 -> 2, in_len + 1 -> in_len, ... (edge pixel repeated).
    period = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    src = period[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_len), taps), src.ravel()), w.ravel())
    return mat


def imresize(x: torch.Tensor, scale: float, antialias: bool = True) -> torch.Tensor:
    """Resize BCHW (or CHW) by ``scale`` like MATLAB ``imresize(x, scale, 'bicubic')``; no clamping."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise ValueError(f"expected a [B,C,H,W] or [C,H,W] tensor, got {getattr(x, 'shape', type(x))}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    h, w = x.shape[-2:]
    out_h, out_w = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    wh = torch.from_numpy(resize_weights(h, out_h, scale, antialias))
    ww = torch.from_numpy(resize_weights(w, out_w, scale, antialias))
    # MATLAB resizes the axis with the smaller scale first; both are equal here, so rows first.
    out = torch.einsum("oh,...hw->...ow", wh, x.double())
    out = torch.einsum("...hw,pw->...hp", out, ww)
    return out.to(x.dtype)


def _check_sr_input(x: torch.Tensor, scale: int) -> None:
    if scale not in SR_SCALES:
        raise ValueError(f"scale must be one of {SR_SCALES}, got {scale}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected a [B,C,H,W] tensor, got {getattr(x, 'shape', type(x))}")
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the scale {scale}; expected multiples of {scale} "
            f"(crop to {h - h % scale}x{w - w % scale} first, e.g. with modcrop)"
        )


def modcrop(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop the bottom/right edges of BCHW so both sides are multiples of ``scale`` (SR convention)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % scale, : w - w % scale]


def bicubic_downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB bicubic downsampling of BCHW in 0..1 by 4, 8 or 16; sides must divide by ``scale``."""
    _check_sr_input(x, scale)
    return imresize(x, 1.0 / scale).clamp(0.0, 1.0)


def bicubic_degrade(
    x: torch.Tensor, scale: int, upsample_back: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (LR, LR upsampled back to HR size or None), both MATLAB bicubic (LLV-FSR/SFMNet convention)."""
    lr = bicubic_downsample(x, scale)
    if not upsample_back:
        return lr, None
    return lr, imresize(lr, float(scale)).clamp(0.0, 1.0)
