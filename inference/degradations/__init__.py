"""Deterministic synthetic degradations for face SR/restoration data and evaluation (CPU, no basicsr).

* ``bicubic_downsample`` / ``bicubic_degrade``: MATLAB-compatible bicubic x4/x8/x16 (LLV-FSR).
* ``blind_degrade``: GFPGAN-style blind degradation with VSPBFR's parameters.
* ``realesrgan_degrade``: Real-ESRGAN second-order degradation with XPSR's parameters.
* ``degrade``: one entry point by mode name. Image ``i`` of a batch uses seed ``seed + i``.
"""

from .blind import BlindConfig, blind_degrade_one
from .matlab_resize import SR_SCALES, bicubic_degrade, bicubic_downsample, imresize, modcrop
from .pipeline import MODES, OUTPUT_SIZES, blind_degrade, degrade, image_seed, realesrgan_degrade
from .realesrgan import RealESRGANConfig, realesrgan_degrade_one

__all__ = [
    "MODES",
    "OUTPUT_SIZES",
    "SR_SCALES",
    "BlindConfig",
    "RealESRGANConfig",
    "bicubic_degrade",
    "bicubic_downsample",
    "blind_degrade",
    "blind_degrade_one",
    "degrade",
    "image_seed",
    "imresize",
    "modcrop",
    "realesrgan_degrade",
    "realesrgan_degrade_one",
]
