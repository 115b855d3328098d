"""Batch entry points: one mode name, one seed, a BCHW batch in 0..1 -> degraded batch + drawn parameters.

Seeding rule: image ``i`` of a batch is degraded with ``numpy.random.default_rng(seed + i)``, so an
image's result does not depend on the batch it came in (the same picture at index 0 with seed 7 and
at index 2 with seed 5 is degraded identically). No global random state is read or changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..images import stack_same_size
from ..progress import progress_bar
from .blind import BlindConfig, blind_degrade_one
from .matlab_resize import bicubic_degrade
from .ops import to_chw, to_hwc
from .realesrgan import RealESRGANConfig, realesrgan_degrade_one

BICUBIC_MODES = {"bicubic_x4": 4, "bicubic_x8": 8, "bicubic_x16": 16}
MODES = (*BICUBIC_MODES, "blind", "realesrgan")
OUTPUT_SIZES = ("input", "lr")


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` in a batch degraded with ``seed`` (documented rule: seed + index)."""
    return seed + index


def _check(x: torch.Tensor, seed: int, rgb: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty [B,C,H,W] tensor, got {getattr(x, 'shape', type(x))}")
    if rgb and x.shape[1] != 3:
        raise ValueError(f"expected 3 RGB channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _per_image(
    x: torch.Tensor,
    seed: int,
    fn: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict]],
    desc: str,
) -> tuple[list[torch.Tensor], list[dict]]:
    outs, params = [], []
    with progress_bar(x.shape[0], desc) as bar:
        for i in range(x.shape[0]):
            s = image_seed(int(seed), i)
            out, p = fn(to_hwc(x[i].clamp(0.0, 1.0)), np.random.default_rng(s))
            outs.append(to_chw(out).unsqueeze(0))
            params.append({"seed": s, **p})
            bar.update(1)
    return outs, params


def blind_degrade(
    x: torch.Tensor, seed: int, config: BlindConfig | None = None
) -> tuple[torch.Tensor, list[dict]]:
    """GFPGAN/VSPBFR blind degradation of an RGB BCHW batch; returns (LQ batch, per-image parameters)."""
    _check(x, seed, rgb=True)
    cfg = config or BlindConfig()
    outs, params = _per_image(x, seed, lambda img, rng: blind_degrade_one(img, rng, cfg), "Blind degradation")
    # Without the resize back each image keeps its own drawn size; a batch then needs equal sizes.
    return stack_same_size(outs, "blind-degraded low-resolution images (size drawn per image)"), params


def realesrgan_degrade(
    x: torch.Tensor, seed: int, config: RealESRGANConfig | None = None
) -> tuple[torch.Tensor, list[dict]]:
    """Real-ESRGAN second-order degradation; returns (LR batch of ``H // scale`` x ``W // scale``, parameters)."""
    _check(x, seed, rgb=True)
    cfg = config or RealESRGANConfig()
    h, w = x.shape[-2:]
    if h < cfg.scale or w < cfg.scale:
        raise ValueError(
            f"image {h}x{w} is smaller than the scale {cfg.scale}; expected both sides >= {cfg.scale}"
        )
    outs, params = _per_image(
        x, seed, lambda img, rng: realesrgan_degrade_one(img, rng, cfg), "Real-ESRGAN degradation"
    )
    return torch.cat(outs, dim=0), params


def degrade(
    x: torch.Tensor,
    mode: str,
    seed: int = 0,
    output_size: str = "input",
    blind_config: BlindConfig | None = None,
    realesrgan_config: RealESRGANConfig | None = None,
) -> tuple[torch.Tensor, dict]:
    """Degrade a BCHW batch by ``mode`` (see MODES); ``output_size`` 'input' or 'lr'. Returns (batch, log)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if output_size not in OUTPUT_SIZES:
        raise ValueError(f"output_size must be one of {OUTPUT_SIZES}, got {output_size!r}")
    log: dict = {
        "mode": mode,
        "seed": int(seed),
        "output_size": output_size,
        "seed_rule": "image i uses seed + i",
    }
    if mode in BICUBIC_MODES:
        _check(x, seed, rgb=False)
        scale = BICUBIC_MODES[mode]
        lr, up = bicubic_degrade(x, scale, upsample_back=output_size == "input")
        log.update(scale=scale, lr_size=list(lr.shape[-2:]), resize="MATLAB bicubic (antialiased)")
        return (up if output_size == "input" else lr), log
    if mode == "blind":
        cfg = blind_config or BlindConfig()
        cfg = dataclasses.replace(cfg, resize_back=output_size == "input")
        out, log["images"] = blind_degrade(x, seed, cfg)
        return out, log
    cfg = realesrgan_config or RealESRGANConfig()
    out, log["images"] = realesrgan_degrade(x, seed, cfg)
    log["scale"] = cfg.scale
    if output_size == "input":
        # XPSR's make_train.py: LR back to the HR size with torch bicubic, as the ControlNet input.
        out = F.interpolate(out, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return out, log
