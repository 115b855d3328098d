"""Blur kernels of the GFPGAN / Real-ESRGAN degradation models, drawn from a numpy Generator.

Kernel families (Real-ESRGAN, Wang et al. 2021): rotated (an)isotropic Gaussian, generalized
Gaussian ``exp(-0.5 q^beta)``, plateau ``1 / (1 + q^beta)`` with ``q = p^T Sigma^-1 p``, and the
circular low-pass (2-D sinc, "ringing") kernel. Every kernel is normalised to sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _grid(size: int) -> np.ndarray:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)  # [K, K, 2] as (x, y) offsets from the centre


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """``p^T Sigma^-1 p`` on the kernel grid for a covariance rotated by ``theta`` (radians)."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    grid = _grid(size)
    return np.sum((grid @ np.linalg.inv(cov)) * grid, axis=-1)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> np.ndarray:
    """Normalised bivariate Gaussian kernel (isotropic when ``sigma_x == sigma_y``)."""
    k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """Normalised generalized Gaussian ``exp(-0.5 q^beta)``; beta < 1 heavier tails, > 1 flatter top."""
    k = np.exp(-0.5 * np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta))
    return k / k.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised plateau kernel ``1 / (1 + q^beta)``."""
    k = 1.0 / (np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta) + 1.0)
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float, pad_to: int = 0) -> np.ndarray:
    """Normalised circular low-pass kernel with cutoff ``omega_c`` (rad/pixel), zero-padded to ``pad_to``."""
    r = np.linalg.norm(_grid(size), axis=-1)
    j1 = torch.special.bessel_j1(torch.from_numpy(omega_c * r)).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * j1 / (2.0 * np.pi * r)
    k[size // 2, size // 2] = omega_c**2 / (4.0 * np.pi)  # the limit of the expression at r = 0
    k = k / k.sum()
    return pad_kernel(k, pad_to) if pad_to > size else k


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a centred odd kernel to ``size`` x ``size`` (no effect on the filtering)."""
    pad = (size - kernel.shape[0]) // 2
    if pad < 0:
        raise ValueError(f"cannot pad a {kernel.shape[0]}x{kernel.shape[0]} kernel to {size}x{size}")
    return np.pad(kernel, pad)


def _draw_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    # Real-ESRGAN's draw: half the time below 1, half above, so both tail shapes are equally likely.
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def random_mixed_kernel(
    rng: np.random.Generator,
    kernel_types: Sequence[str],
    kernel_probs: Sequence[float],
    size: int,
    sigma_range: Sequence[float],
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
) -> tuple[np.ndarray, dict]:
    """Draw a kernel type by probability, then its parameters; return (kernel, drawn parameters)."""
    unknown = set(kernel_types) - set(KERNEL_TYPES)
    if unknown or len(kernel_types) != len(kernel_probs):
        raise ValueError(
            f"kernel types must come from {KERNEL_TYPES} with one probability each, "
            f"got {list(kernel_types)} / {list(kernel_probs)}"
        )
    probs = np.asarray(kernel_probs, dtype=np.float64)
    kind = str(kernel_types[int(rng.choice(len(kernel_types), p=probs / probs.sum()))])
    sigma_x = float(rng.uniform(*sigma_range))
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y = float(rng.uniform(*sigma_range))
        theta = float(rng.uniform(*rotation_range))
    params = {"type": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    if kind.startswith("generalized"):
        params["beta"] = _draw_beta(rng, betag_range)
        kernel = generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    elif kind.startswith("plateau"):
        params["beta"] = _draw_beta(rng, betap_range)
        kernel = plateau_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    else:
        kernel = gaussian_kernel(size, sigma_x, sigma_y, theta)
    return kernel, params


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter an HWC float32 image with a 2-D kernel, reflect-101 borders (basicsr's ``filter2D``)."""
    # All kernels here are point-symmetric, so OpenCV's correlation equals convolution.
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
