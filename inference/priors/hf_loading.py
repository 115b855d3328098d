"""Local transformers model folders for prior extraction: checks, loading, a small cache, batching.

A folder is what ``save_pretrained`` writes (or a hub snapshot copied by hand): ``config.json``,
weights (``model.safetensors``, sharded ``*.index.json`` or ``pytorch_model.bin``) and the
tokenizer/processor files. The family is read from ``config.json``'s ``model_type``; nothing is
ever downloaded (``local_files_only``). Weights load in fp32 on CPU/MPS and fp16/bf16 on CUDA
(inference/device.py). Loaded models are kept in a small least-recently-used cache keyed by
folder, device and dtype, unless the caller asks not to keep them.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import resolve_device, resolve_dtype
from ..progress import check_interrupted, progress_bar

log = logging.getLogger(__name__)

# model_type in config.json -> (family used in provenance ids, transformers model class).
FAMILIES: dict[str, tuple[str, str]] = {
    "blip-2": ("blip2", "Blip2ForConditionalGeneration"),
    "llava": ("llava", "LlavaForConditionalGeneration"),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration"),
    "depth_anything": ("depth_anything", "AutoModelForDepthEstimation"),
    "clip": ("clip_text", "CLIPTextModelWithProjection"),
    "clip_text_model": ("clip_text", "CLIPTextModel"),  # or ...WithProjection, see inspect_folder
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# What each family needs besides config + weights: groups of alternatives, one of each group.
_NEEDS = {
    "blip2": (TOKENIZER_FILES, IMAGE_PROCESSOR_FILES),
    "llava": (TOKENIZER_FILES, IMAGE_PROCESSOR_FILES),
    "llava_next": (TOKENIZER_FILES, IMAGE_PROCESSOR_FILES),
    "depth_anything": (IMAGE_PROCESSOR_FILES,),
    "clip_text": (TOKENIZER_FILES,),
}
MAX_CACHED = 3  # an LLM can fill a GPU: keep few


@dataclass
class HFModel:
    """A loaded transformers model with its processor (or tokenizer), folder and provenance name."""

    family: str  # "blip2", "llava", "llava_next", "depth_anything" or "clip_text"
    folder: Path  # folder holding config.json and the weights
    name: str  # folder name, used in provenance ids
    model: Any
    processor: Any  # processor (BLIP-2/LLaVA), image processor (depth) or tokenizer (CLIP)
    device: torch.device
    dtype: torch.dtype

    @property
    def extractor_id(self) -> str:
        """Provenance id recorded in PriorBundle.sources, e.g. ``"blip2:blip2-opt-2.7b"``."""
        return f"{self.family}:{self.name}"

    def require(self, families: tuple[str, ...], task: str) -> None:
        """Raise a ValueError naming the folder when this model cannot do ``task``."""
        if self.family not in families:
            raise ValueError(
                f"{task} needs a {' or '.join(families)} model, but {self.folder} holds a {self.family} "
                f"model; load a matching folder"
            )


_CACHE: OrderedDict[tuple, HFModel] = OrderedDict()


def _expected(family: str | None) -> str:
    groups = [("config.json",), WEIGHT_FILES] + list(_NEEDS.get(family, ()))
    return "; ".join(" or ".join(g) for g in groups)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json, so it is not a transformers model folder. "
            f"Expected files: {_expected(None)} (plus tokenizer/processor files)."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the folder may be damaged") from None


def _text_encoder_layout(folder: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder); a diffusers pipeline folder uses text_encoder/ + tokenizer/."""
    if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
        return folder / "text_encoder", folder / "tokenizer"
    return folder, folder


def _check_weights(folder: Path, family: str) -> None:
    present = [f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"{folder} has no model weights. Expected one of {', '.join(WEIGHT_FILES)}; found: "
            f"{', '.join(found) or 'nothing'}. Copy the complete model folder ({_expected(family)})."
        )
    index = next((folder / f for f in present if f.endswith(".index.json")), None)
    if index is not None and len(present) == 1:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(
                f"{index} is not a valid weight index ({e!r}); the folder may be damaged"
            ) from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise FileNotFoundError(
                f"{folder} is missing weight shard(s) {', '.join(missing)} listed in {index.name}"
            )


def _check_processor_files(folder: Path, family: str) -> None:
    for group in _NEEDS[family]:
        if not any((folder / f).is_file() for f in group):
            raise FileNotFoundError(
                f"{folder} lacks {' or '.join(group)}, needed by a {family} model. "
                f"A complete folder has: {_expected(family)}."
            )


def inspect_folder(folder: str | Path) -> tuple[str, str, Path, Path]:
    """Check a model folder without loading it: (family, class name, model folder, tokenizer folder)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        kind = "a file, not a folder" if folder.exists() else "missing"
        raise FileNotFoundError(
            f"{folder} is {kind}. Prior extractors load transformers model folders holding {_expected(None)} "
            f"and tokenizer/processor files (single-file weights carry no tokenizer)."
        )
    model_dir, tok_dir = _text_encoder_layout(folder)
    config = _read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{model_dir / 'config.json'} has model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    family, class_name = FAMILIES[model_type]
    if family == "clip_text":
        # Projection weights exist in full CLIP models and SDXL-style encoders, not in SD1.5's.
        archs = set(config.get("architectures") or [])
        with_projection = model_type == "clip" or bool(archs & {"CLIPModel", "CLIPTextModelWithProjection"})
        class_name = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    _check_weights(model_dir, family)
    _check_processor_files(tok_dir, family)
    return family, class_name, model_dir, tok_dir


def _stamp(folder: Path) -> int:
    # Newest modification time of the folder's files: a replaced model is reloaded, not served stale.
    return max((p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()), default=0)


def _load_processor(family: str, tok_dir: Path):
    import transformers

    if family == "depth_anything":
        return transformers.AutoImageProcessor.from_pretrained(tok_dir, local_files_only=True)
    if family == "clip_text":
        return transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(tok_dir, local_files_only=True)
    # Decoder-only generation needs prompts padded on the left so every answer starts at the end.
    processor.tokenizer.padding_side = "left"
    return processor


def load_hf_model(
    folder: str | Path,
    families: tuple[str, ...] | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    keep_loaded: bool = True,
) -> HFModel:
    """Load (or reuse) the model and processor in ``folder``; ``families`` restricts what is accepted."""
    family, class_name, model_dir, tok_dir = inspect_folder(folder)
    folder = Path(folder).expanduser()
    if families is not None and family not in families:
        raise ValueError(f"{folder} holds a {family} model; expected {' or '.join(families)}")
    dev = resolve_device(device)
    dtype = resolve_dtype(dev, precision)
    key = (str(folder.resolve()), str(dev), str(dtype), _stamp(model_dir))
    if key in _CACHE:
        # Reuse what is loaded; keep_loaded=False hands it over and stops keeping it.
        _CACHE.move_to_end(key)
        return _CACHE[key] if keep_loaded else _CACHE.pop(key)
    import transformers

    log.info("loading %s model from %s (%s, %s)", family, model_dir, dev, dtype)
    try:
        model_cls = getattr(transformers, class_name)
        model, info = model_cls.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True, output_loading_info=True
        )
        processor = _load_processor(family, tok_dir)
    except Exception as e:  # transformers and safetensors raise many types for damaged files
        raise ValueError(
            f"could not load the {family} model in {folder}: {e}. The files may be incomplete or damaged "
            f"(expected {_expected(family)})."
        ) from e
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        log.warning(
            "%s: %d weight(s) missing, left random: %s", folder, len(missing), ", ".join(missing[:10])
        )
    hf = HFModel(family, model_dir, folder.name, model.to(dev).eval(), processor, dev, dtype)
    if keep_loaded:
        _CACHE[key] = hf
        while len(_CACHE) > MAX_CACHED:
            _CACHE.popitem(last=False)
    return hf


def release(folder: str | Path | None = None) -> int:
    """Forget cached models of ``folder`` (every folder when None); returns how many were dropped."""
    target = None if folder is None else str(Path(folder).expanduser().resolve())
    keys = [k for k in _CACHE if target is None or k[0] == target]
    for k in keys:
        del _CACHE[k]
    if keys and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(keys)


def cached_folders() -> list[str]:
    """Folders whose models are currently kept loaded (oldest first)."""
    return [k[0] for k in _CACHE]


def check_bchw(images: torch.Tensor, what: str) -> None:
    """Raise a ValueError unless ``images`` is a float [B,3,H,W] batch."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} expects RGB images as a [B,3,H,W] tensor in [0,1], got {got}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} got an empty batch")


def to_uint8_list(images: torch.Tensor) -> list[np.ndarray]:
    """BCHW float in [0,1] -> list of HWC uint8 arrays, the input every image processor accepts."""
    arr = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return list(arr.cpu().numpy())


def in_mini_batches(n: int, batch_size: int, desc: str, fn: Callable[[slice], Any]) -> Iterator[Any]:
    """Call ``fn`` on consecutive slices of ``n`` items under inference mode, with progress and cancel."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.inference_mode(), progress_bar(n, desc) as bar:
        for start in range(0, n, batch_size):
            check_interrupted()
            part = slice(start, min(start + batch_size, n))
            yield fn(part)
            bar.update(part.stop - part.start)
