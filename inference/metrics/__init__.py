"""Image-quality and identity metrics: PSNR/SSIM (RGB and Y), LPIPS-VGG, dlib identity distance.

Names load lazily so that importing ``evaluate_cli`` (for ``priorface --help``) pulls in no torch;
dlib is imported only when an identity distance is computed, LPIPS weights only when asked.
"""

import importlib

_LAZY = {
    "evaluate_folders": "evaluate",
    "pair_metrics": "evaluate",
    "make_grid": "grid",
    "psnr": "psnr_ssim",
    "ssim": "psnr_ssim",
    "rgb_to_y": "psnr_ssim",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
