"""Where a super-resolution error lies in frequency: octave bands of an image and per-band errors.

A face of side N is split into a band-pass stack: ``low(x, s)`` resizes to s x s (bicubic,
antialiased) and back to N x N, and the bands are the differences of consecutive low-passes
(``<16``, ``16-32``, ``32-64``, ``>64`` for sides (16, 32, 64)); they add up to the image exactly.
For an x8 upscaler from 16 px, the ``<16`` band is what the input already holds, and the top band
(detail finer than half the output's sampling rate) is what no L1/L2-trained model can guess:
comparing its energy between two face sets says how much of a PSNR gap is the data, not the model.
Per-band errors do not add up to the total MSE (the low-passes overlap, so cross terms remain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def low_pass(images: torch.Tensor, side: int) -> torch.Tensor:
    """``images`` (BCHW) resized to side x side and back, without clamping (so bands stay exact)."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)


def band_split(images: torch.Tensor, sides=(16, 32, 64)) -> dict[str, torch.Tensor]:
    """Octave bands of BCHW ``images`` keyed by their range in pixels of side; they sum to ``images``."""
    sides = sorted(int(s) for s in sides)
    if not sides or sides[0] < 1 or sides[-1] >= min(images.shape[-2:]):
        raise ValueError(f"band sides must lie in [1, {min(images.shape[-2:])}), got {sides}")
    x = images.double()
    lows = [low_pass(x, s) for s in sides]
    bands = {f"<{sides[0]}": lows[0]}
    for i in range(1, len(sides)):
        bands[f"{sides[i - 1]}-{sides[i]}"] = lows[i] - lows[i - 1]
    bands[f">{sides[-1]}"] = x - lows[-1]
    return bands


def band_errors(output: torch.Tensor, target: torch.Tensor, sides=(16, 32, 64)) -> list[dict]:
    """Per band: mean square energy of ``target`` and mean squared error of ``output`` in that band."""
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    out_bands, ref_bands = band_split(output, sides), band_split(target, sides)
    return [
        {
            "band": name,
            "energy": float(ref.pow(2).mean()),
            "error": float((out_bands[name] - ref).pow(2).mean()),
        }
        for name, ref in ref_bands.items()
    ]
