"""Synthetic degradation node: make low-quality inputs (bicubic, blind GFPGAN-style, Real-ESRGAN) from HQ faces."""

from __future__ import annotations

import json

import torch

from ..inference.degradations import degrade
from ..inference.images import bchw_to_image, image_to_bchw

# UI label -> library mode name.
_MODES = {
    "bicubic x4": "bicubic_x4",
    "bicubic x8": "bicubic_x8",
    "bicubic x16": "bicubic_x16",
    "blind (GFPGAN)": "blind",
    "real-esrgan x4": "realesrgan",
}
_OUTPUT_SIZES = {"input size": "input", "low resolution": "lr"}


class DegradeNode:
    """Degrades a batch of HQ images reproducibly and reports the parameters it drew."""

    NODE_ID = "PriorFaceDegrade"
    DISPLAY_NAME = "PriorFace Degrade"
    CATEGORY = "PriorFace/Data"
    DESCRIPTION = (
        "Synthesises low-quality faces: MATLAB bicubic x4/x8/x16 (LLV-FSR), GFPGAN-style blind "
        "degradation (VSPBFR's recipe) or Real-ESRGAN second-order x4 (XPSR's recipe). "
        "Same seed, same result; image i of a batch uses seed + i."
    )
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("degraded", "parameters")
    OUTPUT_TOOLTIPS = (
        "The degraded images, at the input size or at the low resolution.",
        "JSON of every random choice made, per image (kernel, scales, noise, JPEG quality, ...).",
    )
    FUNCTION = "degrade"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": (
                    "IMAGE",
                    {"tooltip": "High-quality images to degrade (e.g. aligned 512x512 faces)."},
                ),
                "mode": (
                    list(_MODES),
                    {
                        "default": "blind (GFPGAN)",
                        "tooltip": "bicubic: MATLAB imresize, sides must divide by the factor; blind: blur, "
                        "downsample 0.8-8x, noise, JPEG 60-100; real-esrgan: two rounds of blur/resize/noise/JPEG.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "tooltip": "Seed of the random choices; image i of the batch uses seed + i.",
                    },
                ),
                "output_size": (
                    list(_OUTPUT_SIZES),
                    {
                        "default": "input size",
                        "tooltip": "'input size' resizes the result back to the input size (bicubic), as SR "
                        "networks expect; 'low resolution' keeps the small image (blind: batch of 1 only, "
                        "its size is drawn per image).",
                    },
                ),
            }
        }

    def degrade(self, image: torch.Tensor, mode: str, seed: int, output_size: str):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        if output_size not in _OUTPUT_SIZES:
            raise ValueError(f"output_size must be one of {list(_OUTPUT_SIZES)}, got {output_size!r}")
        out, log = degrade(image_to_bchw(image), _MODES[mode], int(seed), _OUTPUT_SIZES[output_size])
        return (bchw_to_image(out), json.dumps(log, indent=1))


NODES = [DegradeNode]
