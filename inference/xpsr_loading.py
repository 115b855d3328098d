"""Assemble an :class:`XPSRPipeline` from a base SD1.5 model and an official XPSR checkpoint folder.

The base model (single-file checkpoint or diffusers folder, via inference/sd_checkpoints.py) gives
the VAE, the CLIP text encoder with its tokenizer, and the scheduler config; the XPSR folder
(``checkpoint-<step>/`` holding ``unet/`` and ``controlnet/``, as the official training saves it)
gives the UNet (SD1.5 weights + pixel attentions) and the SFA ControlNet. The base UNet is not used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from .device import resolve_device, resolve_dtype, xformers_usable
from .model_files import ModelFileNotFoundError, ModelLocator, get_kind
from .xpsr_sampler import XPSRPipeline

log = logging.getLogger(__name__)

XPSR_PARTS = ("unet", "controlnet")
DIFFUSERS_PREFIX = "diffusers/"
NO_BASE = "(no SD1.5 model in models/checkpoints or models/diffusers)"
NO_XPSR = "(no XPSR checkpoint folder in models/priorface/xpsr)"


def base_choices(locator: ModelLocator) -> list[str]:
    """Single-file checkpoints, then diffusers folders (prefixed ``diffusers/``); a placeholder when none."""
    names = locator.list("checkpoints") + [DIFFUSERS_PREFIX + n for n in locator.list("diffusers")]
    return names or [NO_BASE]


def xpsr_choices(locator: ModelLocator) -> list[str]:
    """XPSR ``checkpoint-<step>`` folders (holding unet/ and controlnet/); a placeholder when none."""
    return xpsr_checkpoint_names(locator.list("priorface_xpsr")) or [NO_XPSR]


def resolve_base(locator: ModelLocator, name: str) -> Path:
    """Path of a base-model choice; the error lists every checkpoints and diffusers folder searched."""
    if name == NO_BASE:
        searched = locator.search_dirs("checkpoints") + locator.search_dirs("diffusers")
        what = "an SD1.5 checkpoint (v1-5-pruned-emaonly.safetensors) or diffusers folder"
        raise ModelFileNotFoundError(get_kind("checkpoints"), what, searched)
    if name.startswith(DIFFUSERS_PREFIX):
        return locator.resolve("diffusers", name[len(DIFFUSERS_PREFIX) :])
    return locator.resolve("checkpoints", name)


def resolve_xpsr(locator: ModelLocator, name: str) -> Path:
    """Path of an XPSR checkpoint-folder choice, checked for unet/ and controlnet/."""
    if name == NO_XPSR:
        searched = locator.search_dirs("priorface_xpsr")
        raise ModelFileNotFoundError(get_kind("priorface_xpsr"), "an XPSR checkpoint-<step> folder", searched)
    return check_xpsr_folder(locator.resolve("priorface_xpsr", name))


def xpsr_checkpoint_names(listed: Iterable[str]) -> list[str]:
    """Checkpoint folders from a model-folder listing, where ``x/unet`` and ``x/controlnet`` stand for ``x``."""
    names = set()
    for name in listed:
        parent, _, last = name.rpartition("/")
        if last in XPSR_PARTS:
            names.add(parent or ".")
    return sorted(names, key=str.lower)


def check_xpsr_folder(root: str | Path) -> Path:
    """``root`` if it holds ``unet/`` and ``controlnet/`` with config.json, else FileNotFoundError naming what lacks."""
    root = Path(root)
    missing = [f"{part}/config.json" for part in XPSR_PARTS if not (root / part / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not an XPSR checkpoint folder: it lacks {', '.join(missing)}. Expected the official "
            "checkpoint-<step> folder (unet/ and controlnet/, each with config.json and "
            "diffusion_pytorch_model.safetensors or .bin)."
        )
    return root


def _without_unet(parts):
    # The base UNet is replaced by XPSR's; drop our reference so its memory can be freed.
    if dataclasses.is_dataclass(parts):
        try:
            return dataclasses.replace(parts, unet=None)
        except (TypeError, ValueError):
            return parts
    return parts


def _enable_xformers(modules: Iterable[torch.nn.Module]) -> None:
    for module in modules:
        try:
            module.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError, RuntimeError, NotImplementedError) as e:
            log.warning("xformers not enabled for %s: %s", type(module).__name__, e)


def load_xpsr_pipeline(
    base: str | Path,
    xpsr_root: str | Path,
    device: str | torch.device = "auto",
    precision: str = "auto",
    tokenizer_dirs=None,
    config_root=None,
) -> XPSRPipeline:
    """Load base SD1.5 parts and the XPSR UNet/ControlNet onto ``device`` (fp16/bf16 and xformers only on CUDA)."""
    from ..models.xpsr_checkpoints import load_xpsr_checkpoint
    from .sd_checkpoints import load_sd_parts
    from .sd_prompts import encode_prompts

    root = check_xpsr_folder(xpsr_root)
    device = resolve_device(device)
    dtype = resolve_dtype(device, precision)
    parts = load_sd_parts(
        base, family=None, tokenizer_dirs=tokenizer_dirs, dtype=dtype, config_root=config_root
    )
    if parts.family != "sd15":
        raise ValueError(
            f"XPSR is built on SD1.5, but {base} is a {parts.family!r} model; pick an SD1.5 base"
        )
    unet, controlnet = load_xpsr_checkpoint(root)
    width = parts.text_encoders[0].config.hidden_size
    if unet.config.cross_attention_dim != width:
        raise ValueError(
            f"the XPSR UNet in {root} expects {unet.config.cross_attention_dim}-wide text embeddings, but the text "
            f"encoder of {base} gives {width}; use the SD1.5 base the XPSR weights were trained on"
        )
    parts = _without_unet(parts)
    unet, controlnet = unet.to(device, dtype).eval(), controlnet.to(device, dtype).eval()
    vae = parts.vae.to(device, dtype).eval()
    for encoder in parts.text_encoders:
        encoder.to(device, dtype).eval()
    if xformers_usable(device):
        _enable_xformers((unet, controlnet, vae))

    def encode_text(texts: list[str]) -> torch.Tensor:
        return encode_prompts(parts, texts).embeds

    name = f"{Path(str(base)).stem} + {root.name}"
    return XPSRPipeline(unet, controlnet, vae, dict(parts.scheduler_config or {}), encode_text, name)
