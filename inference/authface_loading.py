"""Assemble an :class:`AuthFaceModel`: stage I SDXL (single file or diffusers folder) + stage II ControlNet.

The ControlNet may be a diffusers folder (``config.json`` + weights, as ``save_pretrained``
writes it) or one safetensors file with diffusers key names (what ComfyUI's ControlNetLoader also
reads). A file carries no config unless PriorFace wrote one into its metadata; otherwise the
architecture is the stage I UNet's encoder (``ControlNetModel.from_unet``, how AuthFace builds
it) with the conditioning-embedding widths read from the tensor shapes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .authface_sampler import AuthFaceModel
from .device import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

_COND_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
# Key prefixes of the original (LDM / ComfyUI-native) ControlNet layout, which this loader does not map.
_LDM_PREFIXES = ("control_model.", "input_blocks.", "input_hint_block.", "zero_convs.")


def controlnet_config_from_shapes(state_dict: dict[str, torch.Tensor]) -> dict:
    """Conditioning channels and embedding widths of a diffusers ControlNet state dict."""
    key = "controlnet_cond_embedding.conv_in.weight"
    if key not in state_dict:
        raise ValueError(f"not a diffusers ControlNet: {key!r} is missing")
    conv_in = state_dict[key]
    blocks = sorted(int(m.group(1)) for k in state_dict if (m := _COND_BLOCK.fullmatch(k)))
    # blocks alternate: same-width conv, then stride-2 conv to the next width (odd indices).
    widths = [int(conv_in.shape[0])] + [
        int(state_dict[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0]) for i in blocks if i % 2
    ]
    return {
        "conditioning_channels": int(conv_in.shape[1]),
        "conditioning_embedding_out_channels": tuple(widths),
    }


def load_controlnet(source: str | Path, unet: torch.nn.Module | None = None) -> torch.nn.Module:
    """A diffusers ControlNetModel from a folder or a safetensors file (architecture from ``unet`` if needed)."""
    from diffusers import ControlNetModel

    from ..models.checkpoint import SAFETENSORS_SUFFIXES, load_weights, read_checkpoint

    source = Path(source)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(
                f"{source} is not a diffusers ControlNet folder: config.json is missing (expected config.json "
                "and diffusion_pytorch_model.safetensors, as ControlNetModel.save_pretrained writes them)"
            )
        return ControlNetModel.from_pretrained(str(source)).eval()
    if not source.is_file():
        raise FileNotFoundError(f"ControlNet file not found: {source}")
    if source.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(
            f"ControlNet weights must be a .safetensors file or a diffusers folder, got {source.name}"
        )
    ckpt = read_checkpoint(source)
    state = dict(ckpt.content)
    if any(k.startswith(_LDM_PREFIXES) for k in state):
        raise ValueError(
            f"{source.name} is a ControlNet in the original (LDM) key layout; PriorFace reads diffusers-format "
            "ControlNets (keys like 'controlnet_down_blocks.0.weight'), as the AuthFace trainer exports them"
        )
    if ckpt.config:
        controlnet = ControlNetModel.from_config(ckpt.config)
    elif unet is not None:
        shapes = controlnet_config_from_shapes(state)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False, **shapes)
    else:
        raise ValueError(
            f"{source.name} carries no config; pass the stage I UNet so its architecture can be used"
        )
    load_weights(controlnet.float(), state, source=str(source))
    return controlnet.eval()


def load_authface(
    sdxl: str | Path,
    controlnet: str | Path | None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    tokenizer_dirs=None,
    config_root=None,
) -> AuthFaceModel:
    """Load stage I SDXL parts and the stage II ControlNet onto ``device`` (fp16/bf16 only on CUDA)."""
    from .sd_checkpoints import load_sd_parts
    from .sd_prompts import encode_prompts

    device = resolve_device(device)
    dtype = resolve_dtype(device, precision)
    parts = load_sd_parts(
        sdxl, family="sdxl", tokenizer_dirs=tokenizer_dirs, dtype=dtype, config_root=config_root
    )
    if parts.family != "sdxl":
        raise ValueError(
            f"AuthFace is built on SDXL, but {sdxl} is a {parts.family!r} model; pick the stage I SDXL"
        )
    net = load_controlnet(controlnet, parts.unet) if controlnet is not None else None
    unet = parts.unet.to(device, dtype).eval()
    if net is not None:
        net = net.to(device, dtype).eval()
    # SDXL's VAE overflows in fp16 (its config says force_upcast); it stays fp32 then.
    vae_dtype = (
        torch.float32
        if dtype == torch.float16 and getattr(parts.vae.config, "force_upcast", False)
        else dtype
    )
    vae = parts.vae.to(device, vae_dtype).eval()
    for encoder in parts.text_encoders:
        encoder.to(device, dtype).eval()

    def encode_text(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = encode_prompts(parts, texts)
        return embeds.embeds, embeds.pooled

    name = Path(str(sdxl)).stem + (f" + {Path(str(controlnet)).stem}" if controlnet is not None else "")
    return AuthFaceModel(unet, vae, net, dict(parts.scheduler_config or {}), encode_text, name)
