"""GFPGAN-style blind face degradation with VSPBFR's training parameters (papers.md section 4.5).

Order: blur (39/41-tap iso/aniso Gaussian) -> optional haze -> bilinear downsample by 1/s ->
Gaussian noise -> JPEG -> bilinear resize back -> optional gray -> 8-bit quantisation.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .kernels import filter2d, random_mixed_kernel
from .ops import add_gaussian_noise, cv2_resize, jpeg, quantize, to_gray


@dataclasses.dataclass(frozen=True)
class BlindConfig:
    """Parameters of the blind degradation; defaults are VSPBFR's restoration-net training recipe."""

    kernel_sizes: tuple[int, ...] = (39, 41)  # 2 * randint(19, 20) + 1
    kernel_types: tuple[str, ...] = ("iso", "aniso")
    kernel_probs: tuple[float, ...] = (0.5, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 10.0)
    rotation: tuple[float, float] = (-math.pi, math.pi)
    downsample: tuple[float, float] = (0.8, 8.0)  # divide the side by s ~ U(0.8, 8)
    noise_sigma_255: tuple[float, float] = (0.0, 20.0)
    jpeg_quality: tuple[int, int] = (60, 100)  # inclusive integer range
    haze_prob: float = 0.008
    haze_alpha: tuple[float, float] = (0.75, 0.95)  # weight kept by the image; the rest is white
    gray_prob: float = 0.008
    resize_back: bool = True  # False: return the small image (before the resize back)

    def __post_init__(self) -> None:
        for name in ("haze_prob", "gray_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if self.downsample[0] <= 0 or self.downsample[0] > self.downsample[1]:
            raise ValueError(f"downsample must be (low, high) with 0 < low <= high, got {self.downsample}")


def blind_degrade_one(img: np.ndarray, rng: np.random.Generator, cfg: BlindConfig) -> tuple[np.ndarray, dict]:
    """Degrade one HWC float32 RGB image; return (LQ, drawn parameters)."""
    h, w = img.shape[:2]
    size = int(cfg.kernel_sizes[int(rng.integers(len(cfg.kernel_sizes)))])
    kernel, kparams = random_mixed_kernel(
        rng, cfg.kernel_types, cfg.kernel_probs, size, cfg.blur_sigma, cfg.rotation
    )
    out = filter2d(img, kernel)
    params: dict = {"blur": kparams, "haze_alpha": None}
    if rng.uniform() < cfg.haze_prob:
        alpha = float(rng.uniform(*cfg.haze_alpha))
        out = alpha * out + (1.0 - alpha)
        params["haze_alpha"] = alpha
    scale = float(rng.uniform(*cfg.downsample))
    small = (int(h // scale), int(w // scale))  # GFPGAN's cv2.resize(w // s, h // s), at least 1 px
    out = cv2_resize(out, *small)
    sigma = float(rng.uniform(*cfg.noise_sigma_255))
    out = add_gaussian_noise(out, rng, sigma)
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    out = jpeg(out, quality)
    if cfg.resize_back:
        out = cv2_resize(out, h, w)
    gray = bool(rng.uniform() < cfg.gray_prob)
    if gray:
        out = to_gray(out)  # the recipe converts the GT too; callers see "gray" in the parameters
    params.update(
        downsample=scale,
        small_size=[max(1, small[0]), max(1, small[1])],
        noise_sigma_255=sigma,
        jpeg_quality=quality,
        gray=gray,
    )
    return quantize(out), params
