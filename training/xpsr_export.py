"""Write trained XPSR weights as the official checkpoint folder: ``unet/`` and ``controlnet/``.

Each subfolder holds ``config.json`` + ``diffusion_pytorch_model.safetensors`` as diffusers'
``save_pretrained`` writes them (the layout the official training saves and
models/xpsr_checkpoints.py ``load_xpsr_checkpoint`` reads), with the XPSR-only config fields the
official classes add (ControlNet ``return_rgbs``/``use_rrdb``/``use_lowlevel_prompt``/``use_latent_pred``,
UNet ``*_use_lowlevel_prompt`` all false). The UNet file holds the whole UNet (frozen SD body + trained
pixel attentions), as the official one does, so the folder is usable on its own with a base SD1.5.

Atomicity: everything is written into a hidden temporary folder beside the target, which is then
renamed over it (the previous folder is moved aside first and deleted after), so a crash leaves
either the old or the new folder complete, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..models.xpsr_controlnet import OFFICIAL_FLAGS

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INFO_NAME = "priorface_xpsr.json"


def _public_config(model: torch.nn.Module, class_name: str, extra: dict[str, Any]) -> dict[str, Any]:
    import diffusers

    cfg = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")
    }
    return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **cfg, **extra}


def _write_part(folder: Path, model: torch.nn.Module, config: dict, dtype: torch.dtype, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}  # fmt: skip
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", **meta})
    with open(folder / WEIGHTS_NAME, "rb") as f:
        os.fsync(f.fileno())


def export_xpsr_folder(
    unet: torch.nn.Module,
    controlnet: torch.nn.Module,
    folder: str | Path,
    dtype: str = "fp32",
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/unet`` and ``folder/controlnet`` (official layout) atomically; ``info`` goes to a JSON file."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    meta = {"priorface.step": str((info or {}).get("step", ""))}
    n_up = len(unet.config.block_out_channels)
    unet_flags = {
        "up_use_lowlevel_prompt": [False] * n_up,
        "mid_use_lowlevel_prompt": False,
        "down_use_lowlevel_prompt": [False] * n_up,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _write_part(
            tmp / "unet", unet, _public_config(unet, "UNet2DConditionModel", unet_flags), DTYPES[dtype], meta
        )
        cn_config = _public_config(controlnet, "ControlNetModel", dict(OFFICIAL_FLAGS))
        _write_part(tmp / "controlnet", controlnet, cn_config, DTYPES[dtype], meta)
        (tmp / INFO_NAME).write_text(json.dumps(info or {}, indent=1, default=str), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        old = folder.parent / f".{folder.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
