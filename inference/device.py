"""Device and dtype choice: fp32 on CPU/MPS, fp16/bf16 only on CUDA, xformers only with CUDA."""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn 'auto'/'cpu'/'cuda'/'cuda:1'/'mps' into a device that exists on this machine."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for, but this machine has no CUDA GPU; use 'cpu' or 'auto'"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was asked for, but MPS is not available here; use 'cpu' or 'auto'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; expected one of {DEVICES} or 'cuda:N'")
    return device


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """Pick the compute dtype; half precision is only honoured on CUDA (CPU/MPS fall back to fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            # Half precision on CPU is slow and numerically fragile in conv/attention kernels.
            log.warning("%s requested on %s: using fp32 instead", precision, device.type)
        return torch.float32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES[precision]


def xformers_usable(device: torch.device) -> bool:
    """True only when xformers is installed *and* the device is CUDA; never imports it otherwise."""
    # xformers installs next to a CPU torch, but its kernels fail there.
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and importlib.util.find_spec("xformers") is not None
    )
