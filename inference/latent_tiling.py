"""Overlapping tiles with weighted blending, for latents and images too large for one model pass.

:func:`tiled_map` cuts a BCHW tensor into overlapping square tiles, runs a function on each and
blends the results with per-tile weights (normalised by their sum, so every output pixel is a
convex combination of the tiles covering it). The function may change the resolution by a fixed
``scale`` (8 for a VAE decoder, 1/8 for an encoder, 1 for a denoiser).

What can be said exactly (tests/test_xpsr_sampler.py checks both):

- a tile at least as large as the input gives one tile: the function is called once on the whole
  input and its output returned unchanged (bit-identical to the untiled path);
- for a function whose output at each pixel depends only on the input at that pixel
  (position-independent and local), every tile computes the same value for a shared pixel, and the
  normalised blend of equal values is that value again: tiled == untiled up to float rounding.

Convolutions with padding, GroupNorm and attention see different context in each tile, so real
models differ near tile borders; the weights (a Gaussian as in XPSR/SeeSR, or a linear ramp over
the overlap as in diffusers' tiled VAE) hide the seams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch

from .progress import check_interrupted

TILE_WEIGHTS = ("gaussian", "linear")
GAUSSIAN_VAR = 0.01  # XPSR/SeeSR: variance 0.01 of the tile-normalised coordinate (sigma = tile / 10)

Box = tuple[int, int, int, int]  # (top, bottom, left, right) in input pixels


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size``, ``overlap`` apart; the last ends at ``size``."""
    if tile <= 0 or overlap < 0:
        raise ValueError(f"tile must be > 0 and overlap >= 0, got tile={tile}, overlap={overlap}")
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    if tile >= size:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def tile_weight(height: int, width: int, kind: str = "gaussian", overlap: int = 0) -> torch.Tensor:
    """(height, width) blending weights of one tile, all > 0 so the normalisation never divides by 0."""
    if kind == "gaussian":
        return _gaussian(height)[:, None] * _gaussian(width)[None, :]
    if kind == "linear":
        return _ramp(height, overlap)[:, None] * _ramp(width, overlap)[None, :]
    raise ValueError(f"unknown tile weight {kind!r}; expected one of {TILE_WEIGHTS}")


def _gaussian(n: int) -> torch.Tensor:
    x = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
    return torch.exp(-(x**2) / (2 * GAUSSIAN_VAR))


def _ramp(n: int, overlap: int) -> torch.Tensor:
    # 1 in the middle, falling linearly to 1/(overlap+1) at both ends over `overlap` pixels.
    i = torch.arange(n, dtype=torch.float64)
    edge = torch.minimum(i, n - 1 - i) + 1
    return torch.clamp(edge / (overlap + 1), max=1.0) if overlap > 0 else torch.ones(n, dtype=torch.float64)


def _scaled(v: int, scale: Fraction, what: str) -> int:
    out = v * scale
    if out.denominator != 1:
        raise ValueError(f"{what} {v} times scale {scale} is not a whole number of pixels")
    return int(out)


def tiled_map(
    fn: Callable[[torch.Tensor, Box], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float | Fraction = 1,
    weight: str = "gaussian",
    align: int = 1,
) -> torch.Tensor:
    """Apply ``fn(tile_tensor, box)`` over overlapping tiles of BCHW ``x`` and blend the outputs.

    ``fn`` returns a BCHW tensor whose spatial size is the tile's times ``scale``; ``box`` is the
    tile's (top, bottom, left, right) in ``x``. ``tile <= 0`` or a tile covering ``x`` calls ``fn``
    once on all of ``x``. ``align`` keeps tile starts on multiples of it (e.g. 8 for a VAE encoder).
    """
    if x.dim() != 4:
        raise ValueError(f"expected a BCHW tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if tile <= 0 or (tile >= h and tile >= w):
        return fn(x, (0, h, 0, w))
    scale = Fraction(scale).limit_denominator(64)
    tile_h, tile_w = min(tile, h), min(tile, w)
    rows = tile_starts(h, tile_h, min(overlap, tile_h - 1), align)
    cols = tile_starts(w, tile_w, min(overlap, tile_w - 1), align)
    out = weights = None
    for top in rows:
        for left in cols:
            check_interrupted()
            box = (top, top + tile_h, left, left + tile_w)
            y = fn(x[:, :, box[0] : box[1], box[2] : box[3]], box)
            oh, ow = _scaled(tile_h, scale, "tile height"), _scaled(tile_w, scale, "tile width")
            if tuple(y.shape[-2:]) != (oh, ow):
                raise ValueError(f"tile function returned {tuple(y.shape[-2:])}, expected {(oh, ow)}")
            if out is None:
                size = (_scaled(h, scale, "height"), _scaled(w, scale, "width"))
                out = torch.zeros(*y.shape[:2], *size, device=y.device, dtype=torch.float32)
                weights = torch.zeros(size, device=y.device, dtype=torch.float32)
            wt = tile_weight(oh, ow, weight, math.ceil(overlap * scale)).to(y.device, torch.float32)
            t, left_out = _scaled(top, scale, "tile top"), _scaled(left, scale, "tile left")
            out[:, :, t : t + oh, left_out : left_out + ow] += y.float() * wt
            weights[t : t + oh, left_out : left_out + ow] += wt
    return (out / weights).to(y.dtype)
