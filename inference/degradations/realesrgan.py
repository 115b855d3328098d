"""Real-ESRGAN second-order degradation with the parameters XPSR used to make its training pairs.

Values: papers.md section 3.6 (XPSR ``utils_data/make_train.py``), which match Real-ESRGAN's own
defaults. Like basicsr's dataset, blur kernels have a random odd size 7..21 (the configured
``blur_kernel_size`` 21/11 is not used by that code). Unlike the original, which draws the resize
mode/scale and the noise type once per batch, every draw here is per image, so an image's result
depends only on its own seed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .kernels import filter2d, random_mixed_kernel, sinc_kernel
from .ops import RESIZE_MODES, jpeg, quantize, random_noise, torch_resize, usm_sharpen


@dataclasses.dataclass(frozen=True)
class RealESRGANConfig:
    """Second-order degradation parameters; defaults are XPSR's (= Real-ESRGAN's) x4 recipe."""

    scale: int = 4
    use_usm: bool = True  # XPSR/Real-ESRGAN degrade the USM-sharpened GT
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = (
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    )
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    second_blur_prob: float = 0.8
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        for name in ("sinc_prob", "gaussian_noise_prob", "second_blur_prob", "final_sinc_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def _blur_kernel(rng: np.random.Generator, cfg: RealESRGANConfig, second: bool) -> tuple[np.ndarray, dict]:
    size = int(cfg.kernel_sizes[int(rng.integers(len(cfg.kernel_sizes)))])
    if rng.uniform() < (cfg.sinc_prob2 if second else cfg.sinc_prob):
        # Small kernels cannot hold a very low cutoff without truncating its ringing.
        omega = float(rng.uniform(math.pi / 3 if size < 13 else math.pi / 5, math.pi))
        return sinc_kernel(size, omega), {"type": "sinc", "size": size, "omega_c": omega}
    sigma = cfg.blur_sigma2 if second else cfg.blur_sigma
    return random_mixed_kernel(
        rng,
        cfg.kernel_types,
        cfg.kernel_probs,
        size,
        sigma,
        (-math.pi, math.pi),
        cfg.betag_range,
        cfg.betap_range,
    )


def _resize_scale(rng: np.random.Generator, probs, value_range) -> tuple[str, float]:
    p = np.asarray(probs, dtype=np.float64)
    kind = ("up", "down", "keep")[int(rng.choice(3, p=p / p.sum()))]
    if kind == "up":
        return kind, float(rng.uniform(1.0, value_range[1]))
    if kind == "down":
        return kind, float(rng.uniform(value_range[0], 1.0))
    return kind, 1.0


def _mode(rng: np.random.Generator) -> str:
    return RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]


def realesrgan_degrade_one(
    img: np.ndarray, rng: np.random.Generator, cfg: RealESRGANConfig
) -> tuple[np.ndarray, dict]:
    """Degrade one HWC float32 RGB image to ``(H // scale, W // scale)``; return (LQ, drawn parameters)."""
    h, w = img.shape[:2]
    # Kernels are drawn first, as the basicsr dataset does before the model's degradation step.
    kernel1, k1 = _blur_kernel(rng, cfg, second=False)
    kernel2, k2 = _blur_kernel(rng, cfg, second=True)
    sinc_final = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(cfg.kernel_sizes[int(rng.integers(len(cfg.kernel_sizes)))])
        omega = float(rng.uniform(math.pi / 3, math.pi))
        sinc_final = (sinc_kernel(size, omega), {"size": size, "omega_c": omega})
    p: dict = {"usm": cfg.use_usm, "blur1": k1}
    out = usm_sharpen(img) if cfg.use_usm else img
    # First order: blur, resize, noise, JPEG.
    out = filter2d(out, kernel1)
    kind, scale = _resize_scale(rng, cfg.resize_prob, cfg.resize_range)
    p["resize1"] = {"type": kind, "scale": scale, "mode": _mode(rng)}
    out = torch_resize(out, p["resize1"]["mode"], scale=scale)
    out, p["noise1"] = random_noise(
        out, rng, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range, cfg.gray_noise_prob
    )
    p["jpeg1"] = int(rng.integers(cfg.jpeg_range[0], cfg.jpeg_range[1] + 1))
    out = jpeg(out, p["jpeg1"])
    # Second order: optional blur, resize relative to the final size, noise.
    p["blur2"] = k2 if rng.uniform() < cfg.second_blur_prob else None
    if p["blur2"] is not None:
        out = filter2d(out, kernel2)
    kind, scale = _resize_scale(rng, cfg.resize_prob2, cfg.resize_range2)
    p["resize2"] = {"type": kind, "scale": scale, "mode": _mode(rng)}
    size2 = (int(h / cfg.scale * scale), int(w / cfg.scale * scale))
    out = torch_resize(out, p["resize2"]["mode"], size=size2)
    out, p["noise2"] = random_noise(
        out, rng, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2, cfg.gray_noise_prob2
    )
    # Last: [resize to the LR size + sinc] and JPEG, in either order (other orders cause twisted lines).
    p["jpeg_first"] = bool(rng.uniform() < 0.5)
    p["final_mode"] = _mode(rng)
    p["jpeg2"] = int(rng.integers(cfg.jpeg_range2[0], cfg.jpeg_range2[1] + 1))
    p["sinc_final"] = sinc_final[1] if sinc_final is not None else None
    if p["jpeg_first"]:
        out = jpeg(out, p["jpeg2"])
    out = torch_resize(out, p["final_mode"], size=(h // cfg.scale, w // cfg.scale))
    if sinc_final is not None:
        out = filter2d(out, sinc_final[0])
    if not p["jpeg_first"]:
        out = jpeg(out, p["jpeg2"])
    return quantize(out), p
