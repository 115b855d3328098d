"""Which Stable Diffusion family a state dict or config belongs to: SD1.5, SDXL, or a clear refusal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .sd_components import FAMILIES
from .sd_keymap import UNET_PREFIX

_SD15_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)
_SDXL_PIPELINES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)


def detect_family(state_dict_or_config: Mapping[str, Any]) -> str:
    """'sd15' or 'sdxl' from a single-file or diffusers UNet state dict, a UNet config or model_index.json."""
    if not isinstance(state_dict_or_config, Mapping):
        raise ValueError(
            f"expected a state dict or config mapping, got {type(state_dict_or_config).__name__}"
        )
    obj = state_dict_or_config
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return _family_of_state(obj)
    if obj.get("family") in FAMILIES:  # metadata config of a file PriorFace exported
        return obj["family"]
    name = obj.get("_class_name", "")
    if name in _SDXL_PIPELINES:
        return "sdxl"
    if name in _SD15_PIPELINES:
        return "sd15"  # model_index alone cannot tell SD2.x apart: load_sd_parts checks the UNet config
    if "block_out_channels" in obj and "cross_attention_dim" in obj:
        return _family_of_unet_config(obj)
    raise ValueError(
        f"cannot tell the model family from this config (_class_name={name or None!r}, keys "
        f"{sorted(obj)[:8]}); expected a Stable Diffusion 1.5/XL model_index.json or UNet config"
    )


def _family_of_unet_config(cfg: Mapping[str, Any]) -> str:
    if cfg.get("addition_embed_type") == "text_time":
        # The refiner conditions on 5 numbers + pooled text whose width equals its context width.
        extra = cfg.get("projection_class_embeddings_input_dim", 0) - 5 * cfg.get(
            "addition_time_embed_dim", 0
        )
        if extra == cfg.get("cross_attention_dim"):
            raise ValueError("this is an SDXL refiner UNet; only SD1.5 and SDXL base models are supported")
        return "sdxl"
    if cfg.get("use_linear_projection") or cfg.get("cross_attention_dim") == 1024:
        raise ValueError("this looks like a Stable Diffusion 2.x UNet; only SD1.5 and SDXL are supported")
    return "sd15"


def _family_of_state(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)
    if (
        any(k.startswith("conditioner.embedders.1.model.") for k in keys)
        or f"{UNET_PREFIX}label_emb.0.0.weight" in sd
    ):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ValueError("this is an SDXL refiner checkpoint; only SD1.5 and SDXL base models are supported")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ValueError(
            "this is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder); SD2 is not supported"
        )
    proj = sd.get(f"{UNET_PREFIX}input_blocks.1.1.proj_in.weight")
    if proj is not None or any(k.startswith("cond_stage_model.transformer.") for k in keys):
        if proj is not None and proj.dim() == 2:
            raise ValueError(
                "this UNet uses linear transformer projections (SD2.x); only SD1.5/SDXL are supported"
            )
        return "sd15"
    if "add_embedding.linear_1.weight" in sd:
        return "sdxl"
    proj = sd.get("down_blocks.0.attentions.0.proj_in.weight")
    if proj is not None:
        if proj.dim() == 2:
            raise ValueError(
                "this UNet uses linear transformer projections (SD2.x); only SD1.5/SDXL are supported"
            )
        return "sd15"
    raise ValueError(
        f"not a Stable Diffusion 1.5/XL checkpoint: none of its {len(keys)} keys (first: {keys[:3]}) is a "
        f"UNet key ({UNET_PREFIX}… or diffusers down_blocks.…) or an SD text-encoder key"
    )
