"""SD1.5 / SDXL checkpoints: load single files or diffusers folders into diffusers parts, export single files.

Single files are read in the layout ComfyUI's CheckpointLoaderSimple reads (inference/sd_keymap.py)
and converted with our own key map onto models built from diffusers configs: the shipped
``configs/diffusers/<family>/`` (published SD1.5 and SDXL base 1.0 shapes), the configs a file
exported by PriorFace carries in its metadata, or a caller's ``config_root``. Nothing is fetched
from the hub. Every missing, unexpected or mis-shaped key is reported by name; only known
by-products of the original training code (EMA copies, noise-schedule buffers, ``position_ids``,
``logit_scale``) are skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import (
    ARCH_KEY,
    CONFIG_KEY,
    KeyMismatchError,
    KeyReport,
    read_checkpoint,
    write_atomically,
)
from . import sd_keymap as km
from .sd_components import (
    COMPONENTS,
    FAMILIES,
    TOKENIZER_NAMES,
    build_meta,
    canonical_state,
    config_dir,
    load_component_folder,
    load_tokenizer,
    materialize,
    read_component_configs,
    read_json,
    scheduler_config,
)
from .sd_family import detect_family

log = logging.getLogger(__name__)

__all__ = ["SDParts", "detect_family", "export_single_file", "load_sd_parts"]

ARCHITECTURE = "stable-diffusion"
FAMILY_KEY = "priorface.family"
MODELSPEC = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
# Everything a single file may hold under these prefixes must be used by a component.
COMPONENT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
# By-products of the original training code and of ComfyUI saves, not needed by diffusers models.
KNOWN_EXTRAS = (
    "model_ema.*",
    "betas",
    "alphas_cumprod*",
    "sqrt_*",
    "log_one_minus_alphas_cumprod",
    "posterior_*",
    "logvar",
    "lvlb_weights",
    "denoiser.*",
    "v_pred",
    "ztsnr",
    "*.position_ids",
    "*.logit_scale",
    "cond_stage_model.transformer.text_projection.weight",
    "conditioner.embedders.0.transformer.text_projection.weight",
)


@dataclass
class SDParts:
    """Diffusers components of one SD1.5 or SDXL model."""

    family: str  # "sd15" or "sdxl"
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoders: list  # sd15: [CLIPTextModel]; sdxl: [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list  # CLIPTokenizer per encoder; None where no tokenizer files were found
    scheduler_config: dict  # DDPMScheduler config of SD training
    source: str


def load_sd_parts(
    source: str | os.PathLike,
    family: str | None = None,
    tokenizer_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    dtype: torch.dtype = torch.float32,
    config_root: str | os.PathLike | None = None,
) -> SDParts:
    """Load an SD1.5/SDXL single-file checkpoint or diffusers folder into diffusers components."""
    # tokenizer_dirs: one CLIP tokenizer folder for every encoder, or one per encoder; when given it
    # replaces a diffusers folder's tokenizer/ and tokenizer_2/. config_root: see config_dir().
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        parts = _load_folder(path, family, dtype)
    elif path.is_file():
        parts = _load_single_file(path, family, dtype, config_root)
    else:
        raise FileNotFoundError(
            f"{path} does not exist: expected a single-file SD1.5/SDXL checkpoint (.safetensors, .ckpt) "
            f"or a diffusers folder with model_index.json"
        )
    if tokenizer_dirs is not None:
        parts.tokenizers = _tokenizers(tokenizer_dirs, parts.family)
    return parts


def _check_family(found: str, wanted: str | None, source: Path) -> str:
    if wanted is not None and wanted != found:
        raise ValueError(f"{source} holds an {found} model, but family={wanted!r} was asked for")
    return found


def _tokenizers(dirs, family: str) -> list:
    count = len(COMPONENTS[family]) - 2
    shared = isinstance(dirs, (str, os.PathLike)) or len(dirs) == 1
    folders = (
        [Path(dirs if isinstance(dirs, (str, os.PathLike)) else dirs[0])] * count if shared else list(dirs)
    )
    if len(folders) != count:
        raise ValueError(
            f"{family} has {count} text encoder(s); got {len(folders)} tokenizer folders: {dirs}"
        )
    # SDXL's second tokenizer pads with "!" (id 0), as diffusers' tokenizer_2 and ComfyUI's clip-G do;
    # one shared CLIP-L folder (ComfyUI's sd1_tokenizer) pads with <|endoftext|>, so override it there.
    return [load_tokenizer(Path(f), "!" if shared and i == 1 else None) for i, f in enumerate(folders)]


def _load_folder(folder: Path, family: str | None, dtype: torch.dtype) -> SDParts:
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder: no model_index.json (expected model_index.json, "
            f"unet/, vae/, text_encoder/, tokenizer/, scheduler/ as save_pretrained writes them)"
        )
    found = detect_family(read_json(folder / "unet" / "config.json"))
    found = _check_family(found, family, folder)
    models = [load_component_folder(kind, folder / name, dtype) for name, kind in COMPONENTS[found].items()]
    tokenizers = [
        load_tokenizer(folder / name) if (folder / name / "vocab.json").is_file() else None
        for name in TOKENIZER_NAMES[: len(models) - 2]
    ]
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = scheduler_config(found, read_json(sched_file) if sched_file.is_file() else None)
    return SDParts(found, models[0], models[1], models[2:], tokenizers, sched, str(folder))


def _file_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    ckpt = read_checkpoint(path)
    content = ckpt.content
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]  # original .ckpt files wrap the weights with training state
    state = (
        {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
        if isinstance(content, Mapping)
        else {}
    )
    if not state:
        raise ValueError(
            f"{path} holds no tensors ({type(content).__name__}); expected an SD1.5/SDXL checkpoint"
        )
    # Early SD1 files used transformers' pre-4.x CLIP layout without the text_model level.
    old = "cond_stage_model.transformer."
    for k in [k for k in state if k.startswith(old) and not k.startswith(old + "text_model.")]:
        state[old + "text_model." + k[len(old) :]] = state.pop(k)
    return state, ckpt.metadata


def _file_configs(meta: Mapping[str, str], family: str, config_root) -> tuple[dict, dict | None]:
    if config_root is not None:
        folder = config_dir(config_root, family)
        sched = folder / "scheduler" / "config.json"
        return read_component_configs(folder, family), (read_json(sched) if sched.is_file() else None)
    embedded = json.loads(meta.get(CONFIG_KEY, "{}")) if meta.get(ARCH_KEY) == ARCHITECTURE else {}
    if embedded.get("family") == family:
        return embedded["components"], embedded.get("scheduler")
    return read_component_configs(config_dir(None, family), family), None


def _load_single_file(path: Path, family: str | None, dtype: torch.dtype, config_root) -> SDParts:
    state, meta = _file_state(path)
    try:
        found = detect_family(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    found = _check_family(found, family, path)
    configs, sched = _file_configs(meta, found, config_root)
    plan = []  # (component name, kind, meta model, ops)
    expected: dict[str, tuple[km.KeyOp, tuple[int, ...]]] = {}
    for name, kind in COMPONENTS[found].items():
        model = build_meta(kind, configs[name])
        canon = canonical_state(kind, model)
        ops = km.component_ops(kind, found, canon)
        plan.append((name, kind, model, ops))
        expected.update({op.ldm: (op, tuple(op.to_ldm(canon).shape)) for op in ops})
    _check_keys(state, expected, path)
    models = []
    for name, kind, model, ops in plan:
        canon = km.from_single_file(ops, state)
        models.append(materialize(kind, model, canon, f"{path} ({name})", dtype))
        for op in ops:  # free the file's copy as soon as a component owns its tensors
            del state[op.ldm]
    overrides = dict(sched or {})
    if "v_pred" in state:  # ComfyUI's marker for v-prediction models
        overrides["prediction_type"] = "v_prediction"
    if "ztsnr" in state:
        overrides["rescale_betas_zero_snr"] = True
    tokenizers = [None] * (len(models) - 2)
    return SDParts(
        found, models[0], models[1], models[2:], tokenizers, scheduler_config(found, overrides), str(path)
    )


def _check_keys(state: Mapping[str, torch.Tensor], expected: Mapping, path: Path) -> None:
    report = KeyReport(missing=sorted(k for k in expected if k not in state))
    ignored = []
    for k, v in state.items():
        if k in expected:
            op, shape = expected[k]
            flat_ok = op.kind == "conv1x1" and tuple(v.shape) == shape[:2]  # Linear-saved VAE attention
            if tuple(v.shape) != shape and not flat_ok:
                report.shape_mismatch.append((k, tuple(v.shape), shape))
        elif any(fnmatchcase(k, p) for p in KNOWN_EXTRAS):
            continue
        elif k.startswith(COMPONENT_PREFIXES):
            report.unexpected.append(k)
        else:
            ignored.append(k)
    if not report.ok:
        raise KeyMismatchError(report, str(path))
    if ignored:
        log.warning(
            "%s: ignoring %d key(s) outside the SD components: %s",
            path,
            len(ignored),
            ", ".join(ignored[:10]),
        )


def export_single_file(parts: SDParts, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``parts`` as one safetensors file in ComfyUI's CheckpointLoaderSimple layout (atomic)."""
    from safetensors.torch import save_file

    if parts.family not in FAMILIES:
        raise ValueError(f"SDParts.family must be one of {FAMILIES}, got {parts.family!r}")
    models = [parts.unet, parts.vae, *parts.text_encoders]
    if len(models) != len(COMPONENTS[parts.family]):
        raise ValueError(
            f"{parts.family} needs {len(COMPONENTS[parts.family]) - 2} text encoder(s), got {len(parts.text_encoders)}"
        )
    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    for (name, kind), model in zip(COMPONENTS[parts.family].items(), models, strict=True):
        canon = canonical_state(kind, model)
        for k, v in km.to_single_file(km.component_ops(kind, parts.family, canon), canon).items():
            v = v.detach().to("cpu")
            tensors[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        configs[name] = _config_of(kind, model)
    meta = {
        ARCH_KEY: ARCHITECTURE,
        FAMILY_KEY: parts.family,
        CONFIG_KEY: json.dumps(
            {"family": parts.family, "components": configs, "scheduler": parts.scheduler_config}
        ),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC[parts.family],
    }
    path = Path(path)
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def _config_of(kind: str, model) -> dict[str, Any]:
    if kind in ("unet", "vae"):
        raw = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    else:
        raw = model.config.to_diff_dict()
    return json.loads(json.dumps(raw, default=str))  # tuples -> lists, dtypes -> names
