"""Input declarations several PriorFace nodes share (same widget, same range, same tooltip)."""

from __future__ import annotations


def upscale_input() -> tuple:
    """Whole-photo upscale factor of the restore-photo nodes."""
    return (
        "FLOAT",
        {
            "default": 1.0,
            "min": 1.0,
            "max": 8.0,
            "step": 0.5,
            "tooltip": "Upscale the whole photo by this factor (bicubic background).",
        },
    )


def strength_input() -> tuple:
    """Blend between the restored face (1) and the original (0)."""
    return (
        "FLOAT",
        {
            "default": 1.0,
            "min": 0.0,
            "max": 1.0,
            "step": 0.05,
            "tooltip": "Blend of restored (1) and original (0) faces.",
        },
    )
