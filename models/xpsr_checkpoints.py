"""Load official XPSR checkpoint folders (``checkpoint-<step>/unet`` and ``/controlnet``) into our classes.

The official code saves both models with diffusers' ``save_pretrained`` (diffusers 0.21.4): a folder
with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (``.bin`` for older saves; sharded
``*.index.json`` also accepted). Our models keep the official key names, so weights load 1:1; every
missing, unexpected or mis-shaped key is reported by name (models/checkpoint.KeyMismatchError).

XPSR-only config fields are checked, then dropped before diffusers builds the model:
ControlNet ``return_rgbs``, ``use_rrdb``, ``use_lowlevel_prompt``, ``use_latent_pred`` (defaults of the
official class: True, False, True, True); UNet ``{up,mid,down}_use_lowlevel_prompt`` (must be false:
the released training builds the UNet without SFA). A checkpoint saved without the training-only
heads (``return_rgbs``/``use_latent_pred`` false) loads with those heads left at random init.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import KeyReport, load_weights, read_checkpoint
from .xpsr_controlnet import OFFICIAL_FLAGS, build_xpsr_controlnet
from .xpsr_unet import build_xpsr_unet

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INDEX_FILES = tuple(f"{name}.index.json" for name in WEIGHT_FILES)
UNET_SFA_FLAGS = ("down_use_lowlevel_prompt", "mid_use_lowlevel_prompt", "up_use_lowlevel_prompt")


def read_diffusers_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config, state dict, weights path) of a diffusers model folder; FileNotFoundError names what is missing."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no config.json in {folder}: expected a diffusers model folder (save_pretrained)"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return config, _tensors(read_checkpoint(folder / name).content, folder / name), folder / name
    for name in INDEX_FILES:
        if (folder / name).is_file():
            shards = sorted(
                set(json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"].values())
            )
            state = {}
            for shard in shards:
                state.update(_tensors(read_checkpoint(folder / shard).content, folder / shard))
            return config, state, folder / name
    raise FileNotFoundError(f"no weights in {folder}: expected one of {WEIGHT_FILES + INDEX_FILES}")


def _tensors(content: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors (got {type(content).__name__})")
    return dict(content)


def _public(config: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in drop}


def unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """Diffusers UNet config from an official XPSR unet/config.json; ValueError if it enables UNet SFA."""
    enabled = {k: config[k] for k in UNET_SFA_FLAGS if k in config and any(_as_list(config[k]))}
    if enabled:
        raise ValueError(
            f"XPSR UNet with Semantic-Fusion Attention is not supported (config has {enabled}); "
            "the released XPSR training builds the UNet with these flags false"
        )
    return _public(config, UNET_SFA_FLAGS)


def controlnet_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(diffusers ControlNet config, key patterns allowed to be missing) from an official controlnet/config.json."""
    flags = {k: bool(config.get(k, v)) for k, v in OFFICIAL_FLAGS.items()}
    if flags["use_rrdb"]:
        raise ValueError(
            "XPSR ControlNet with use_rrdb=true is not supported (the released model has use_rrdb=false)"
        )
    if not flags["use_lowlevel_prompt"]:
        raise ValueError(
            "this ControlNet config has use_lowlevel_prompt=false: it is not an XPSR (SFA) ControlNet"
        )
    allowed_missing = []
    if not flags["return_rgbs"]:
        allowed_missing.append("controlnet_cond_embedding.to_rgbs.*")
    if not flags["use_latent_pred"]:
        allowed_missing += ["conv_degradation.*", "conv_degradation_mid.*"]
    return _public(config, tuple(OFFICIAL_FLAGS)), allowed_missing


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_xpsr_unet(folder: str | Path) -> tuple[nn.Module, KeyReport]:
    """XPSR UNet (with pixel attentions) from an official ``unet/`` folder; raises on any key mismatch."""
    config, state, path = read_diffusers_folder(folder)
    model = build_xpsr_unet(unet_config(config))
    report = load_weights(model, state, source=str(path))
    return model.eval(), report


def load_xpsr_controlnet(folder: str | Path) -> tuple[nn.Module, KeyReport]:
    """XPSR ControlNet (SFA + heads) from an official ``controlnet/`` folder; raises on any key mismatch."""
    config, state, path = read_diffusers_folder(folder)
    cfg, allowed_missing = controlnet_config(config)
    model = build_xpsr_controlnet(cfg)
    report = load_weights(model, state, source=str(path), ignore_missing=allowed_missing)
    if allowed_missing:
        logger.info("%s has no training-only heads %s; they stay at random init", path, allowed_missing)
    return model.eval(), report


def load_xpsr_checkpoint(root: str | Path) -> tuple[nn.Module, nn.Module]:
    """(unet, controlnet) from an official ``checkpoint-<step>`` folder holding ``unet/`` and ``controlnet/``."""
    root = Path(root)
    missing = [name for name in ("unet", "controlnet") if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{root} lacks the subfolder(s) {missing}; expected an XPSR checkpoint-<step> folder"
        )
    unet, _ = load_xpsr_unet(root / "unet")
    controlnet, _ = load_xpsr_controlnet(root / "controlnet")
    return unet, controlnet
