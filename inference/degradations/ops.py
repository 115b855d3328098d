"""Single degradation steps on one HWC float32 RGB image in 0..1: noise, JPEG, resizing, sharpening.

Random steps take a ``numpy.random.Generator`` and return ``(image, drawn parameters)`` so that a
whole pipeline is reproducible from one seed and can be logged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .kernels import filter2d

# ITU-R BT.601 luma weights, as used by OpenCV's RGB2GRAY and torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
RESIZE_MODES = ("area", "bilinear", "bicubic")


def to_hwc(chw: torch.Tensor) -> np.ndarray:
    """CHW RGB tensor -> contiguous HWC float32 numpy array."""
    return np.ascontiguousarray(chw.detach().cpu().float().permute(1, 2, 0).numpy())


def to_chw(hwc: np.ndarray) -> torch.Tensor:
    """HWC numpy array -> CHW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(hwc, dtype=np.float32)).permute(2, 0, 1).contiguous()


def quantize(img: np.ndarray) -> np.ndarray:
    """Clip to 0..1 and round to the 8-bit grid (what saving as PNG does)."""
    return (np.clip(np.round(img * 255.0), 0, 255) / 255.0).astype(np.float32)


def to_gray(img: np.ndarray) -> np.ndarray:
    """RGB -> luma replicated over three channels."""
    return np.repeat((img @ _LUMA)[..., None], 3, axis=2).astype(np.float32)


def add_gaussian_noise(
    img: np.ndarray, rng: np.random.Generator, sigma_255: float, gray: bool = False
) -> np.ndarray:
    """Add N(0, sigma/255) noise (one field shared by all channels when ``gray``) and clip to 0..1."""
    h, w, c = img.shape
    noise = rng.standard_normal((h, w, 1) if gray else (h, w, c), dtype=np.float32)
    return np.clip(img + noise * np.float32(sigma_255 / 255.0), 0.0, 1.0)


def add_poisson_noise(
    img: np.ndarray, rng: np.random.Generator, scale: float, gray: bool = False
) -> np.ndarray:
    """Add scaled shot noise, Real-ESRGAN style (counts = 2^ceil(log2(distinct 8-bit levels))); clip."""
    src = (img @ _LUMA)[..., None] if gray else img
    src = np.clip(np.round(src * 255.0), 0, 255) / 255.0
    levels = 2 ** math.ceil(math.log2(len(np.unique(src))))
    noise = rng.poisson(src * levels) / levels - src
    return np.clip(img + (noise * scale).astype(np.float32), 0.0, 1.0)


def random_noise(
    img: np.ndarray,
    rng: np.random.Generator,
    gaussian_prob: float,
    sigma_range: Sequence[float],
    poisson_range: Sequence[float],
    gray_prob: float,
) -> tuple[np.ndarray, dict]:
    """Gaussian noise with probability ``gaussian_prob``, otherwise Poisson; gray with ``gray_prob``."""
    if rng.uniform() < gaussian_prob:
        sigma = float(rng.uniform(*sigma_range))
        gray = bool(rng.uniform() < gray_prob)
        return add_gaussian_noise(img, rng, sigma, gray), {
            "type": "gaussian",
            "sigma_255": sigma,
            "gray": gray,
        }
    scale = float(rng.uniform(*poisson_range))
    gray = bool(rng.uniform() < gray_prob)
    return add_poisson_noise(img, rng, scale, gray), {"type": "poisson", "scale": scale, "gray": gray}


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through OpenCV's JPEG codec (4:2:0) at ``quality`` 0..100."""
    if not 0 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 0..100, got {quality}")
    u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {img.shape}")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def cv2_resize(img: np.ndarray, height: int, width: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """OpenCV resize of an HWC image to ``height`` x ``width`` (at least 1 pixel each)."""
    out = cv2.resize(img, (max(1, width), max(1, height)), interpolation=interpolation)
    return out if out.ndim == 3 else out[..., None]


def torch_resize(
    img: np.ndarray, mode: str, size: tuple[int, int] | None = None, scale: float | None = None
) -> np.ndarray:
    """``F.interpolate`` an HWC image by ``size`` or ``scale`` (Real-ESRGAN's resizes, no antialias)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    x = to_chw(img).unsqueeze(0)
    kwargs = {} if mode == "area" else {"align_corners": False}
    if size is not None:
        out = F.interpolate(x, size=(max(1, size[0]), max(1, size[1])), mode=mode, **kwargs)
    else:
        h, w = img.shape[:2]
        if int(h * scale) < 1 or int(w * scale) < 1:
            out = F.interpolate(x, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode=mode, **kwargs)
        else:
            out = F.interpolate(x, scale_factor=scale, mode=mode, **kwargs)
    return to_hwc(out[0])


def usm_sharpen(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: int = 10) -> np.ndarray:
    """Unsharp masking with a soft edge mask (Real-ESRGAN sharpens the GT before degrading it)."""
    if radius % 2 == 0:
        radius += 1  # odd Gaussian support, as in basicsr's USMSharp (50 -> 51)
    g = cv2.getGaussianKernel(radius, 0)
    kernel = g @ g.T
    residual = img - filter2d(img, kernel)
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft = filter2d(mask, kernel)
    sharp = np.clip(img + weight * residual, 0.0, 1.0)
    return (soft * sharp + (1.0 - soft) * img).astype(np.float32)
