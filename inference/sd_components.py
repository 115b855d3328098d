"""Building SD components from configs and state dicts: meta-device construction, configs, tokenizers.

Models are constructed on the ``meta`` device (no memory, no random init: an SDXL UNet would
otherwise spend seconds initialising 2.6 B weights that are overwritten at once) and the checked
state dict is then assigned. Text encoders are handled under transformers-4 key names
(``text_model.…``); transformers 5 dropped that prefix for ``CLIPTextModel``, so keys are
translated to whatever the installed version uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import KeyMismatchError, KeyReport, match_state_dict, read_checkpoint

log = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "diffusers"
FAMILIES = ("sd15", "sdxl")
# Component folder name -> model kind, in the order SDParts lists them.
COMPONENTS = {
    "sd15": {"unet": "unet", "vae": "vae", "text_encoder": "clip"},
    "sdxl": {"unet": "unet", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "clip_proj"},
}
ENCODER_NAMES = ("text_encoder", "text_encoder_2")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_WEIGHT_SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")
# diffusers < 0.14 named the VAE attention projections differently; same tensors.
_OLD_VAE_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON config file; FileNotFoundError/ValueError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file may be damaged") from None


def config_dir(config_root: str | Path | None, family: str) -> Path:
    """Folder with unet/, vae/, text_encoder*/ configs: ``<root>/<family>/`` or ``<root>/`` itself."""
    root = Path(config_root).expanduser() if config_root is not None else SHIPPED_CONFIGS
    for folder in (root / family, root):
        if (folder / "unet" / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no diffusers configs for {family} under {root}: expected {root / family / 'unet' / 'config.json'} "
        f"(and vae/, text_encoder/ configs beside it)"
    )


def read_component_configs(folder: Path, family: str) -> dict[str, dict[str, Any]]:
    """Configs of every component of ``family`` in a diffusers-style folder."""
    return {name: read_json(folder / name / "config.json") for name in COMPONENTS[family]}


def scheduler_defaults(family: str) -> dict[str, Any]:
    """The shipped SD training schedule of ``family`` (diffusers scheduler config, no class name)."""
    return {k: v for k, v in scheduler_config(family).items() if k != "_class_name"}


def scheduler_config(family: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DDPMScheduler config of SD training, updated with the training-relevant keys of ``overrides``."""
    config = read_json(SHIPPED_CONFIGS / family / "scheduler" / "config.json")
    allowed = set(config) - {"_class_name"}
    config.update({k: v for k, v in (overrides or {}).items() if k in allowed})
    return config


def canonical(key: str) -> str:
    """transformers-4 name of a CLIP text-encoder key (``text_model.`` prefix on the text model)."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def _model_class(kind: str):
    if kind in ("unet", "vae"):
        import diffusers

        return diffusers.UNet2DConditionModel if kind == "unet" else diffusers.AutoencoderKL
    import transformers

    return transformers.CLIPTextModel if kind == "clip" else transformers.CLIPTextModelWithProjection


def build_meta(kind: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """Model of ``kind`` (unet, vae, clip, clip_proj) with every tensor on the meta device."""
    cls = _model_class(kind)
    with torch.device("meta"):
        if kind in ("unet", "vae"):
            return cls.from_config(dict(config))
        from transformers import CLIPTextConfig

        public = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        return cls(CLIPTextConfig(**public))


def canonical_state(kind: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model state dict under canonical names, without the position_ids buffer (derived, not learnt)."""
    sd = model.state_dict()
    if kind in ("unet", "vae"):
        return dict(sd)
    return {canonical(k): v for k, v in sd.items() if not k.endswith("position_ids")}


def materialize(
    kind: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype
) -> torch.nn.Module:
    """Assign a canonical-named state dict to a meta model; KeyMismatchError names any difference."""
    if kind not in ("unet", "vae"):
        names = {canonical(k): k for k in model.state_dict()}
        state = {names.get(k, k): v for k, v in state.items()}
    report = match_state_dict(
        model, state, ignore_missing=("*position_ids",), ignore_unexpected=("*position_ids",)
    )
    if not report.ok:
        raise KeyMismatchError(report, source)
    own = model.state_dict()
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items() if k in own}
    # strict=False only for position_ids, a derived buffer that some files carry and some lack.
    model.load_state_dict(cast, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(
                attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=name in own
            )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor neither in the state dict nor derivable: report it like a missing key
        raise KeyMismatchError(KeyReport(missing=left), source)
    return model.eval()


def component_weights(folder: Path) -> dict[str, torch.Tensor]:
    """State dict of a diffusers/transformers component folder (single, fp16-variant or sharded)."""
    for stem in _WEIGHT_STEMS:
        for suffix in _WEIGHT_SUFFIXES:
            path = folder / (stem + suffix)
            if path.is_file():
                return _tensors(read_checkpoint(path).content, path)
            index = folder / (stem + suffix + ".index.json")
            if index.is_file():
                state: dict[str, torch.Tensor] = {}
                for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
                    state.update(_tensors(read_checkpoint(folder / shard).content, folder / shard))
                return state
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "the folder is missing"
    raise FileNotFoundError(
        f"no weights in {folder}: expected diffusion_pytorch_model.safetensors or model.safetensors "
        f"(.bin, .fp16 variants and sharded *.index.json also read); found: {found}"
    )


def _tensors(content: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors (got {type(content).__name__})")
    return dict(content)


def load_component_folder(kind: str, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Build one component from its diffusers/transformers folder (config.json + weights)."""
    model = build_meta(kind, read_json(folder / "config.json"))
    state = component_weights(folder)
    if kind == "vae" and any(".query." in k for k in state):
        for old, new in _OLD_VAE_ATTENTION.items():
            state = {k.replace(old, new): v for k, v in state.items()}
    if kind in ("clip", "clip_proj"):
        state = {canonical(k): v for k, v in state.items()}
    return materialize(kind, model, state, str(folder), dtype)


def load_tokenizer(folder: Path, pad_token: str | None = None):
    """CLIPTokenizer from a local folder (vocab.json + merges.txt); ``pad_token`` overrides padding."""
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise FileNotFoundError(f"{folder} holds no CLIP tokenizer: expected vocab.json and merges.txt")
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
