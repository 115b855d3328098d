"""Where model files live: folder kinds, listing, and lookup with errors that say where to look.

One :class:`ModelLocator` serves ComfyUI and headless runs alike; only the function that gives
the folders of a kind differs. Inside ComfyUI the node layer registers every kind below with
``folder_paths`` (so ``extra_model_paths.yaml`` applies) and asks it for the folders. Headless,
:func:`headless_locator` reads a ComfyUI ``models`` folder (``--models-dir`` or the environment
variable ``PRIORFACE_MODELS_DIR``) plus an optional ``extra_model_paths.yaml``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODELS_DIR_ENV = "PRIORFACE_MODELS_DIR"
EXTRA_PATHS_ENV = "PRIORFACE_EXTRA_MODEL_PATHS"

# ComfyUI's own list of weight file extensions (folder_paths.supported_pt_extensions).
# Old folder keys that ComfyUI maps to their new names (folder_paths.map_legacy).
LEGACY_KEYS = {"clip": "text_encoders", "unet": "diffusion_models"}

WEIGHT_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


@dataclass(frozen=True)
class ModelKind:
    """A model folder: its ComfyUI ``folder_paths`` key, default place, and what goes in it."""

    key: str  # folder_paths key; ecosystem names where one exists, ours start with "priorface_"
    subdir: str  # default location below ComfyUI's models/ folder
    extensions: tuple[str, ...]  # files listed; empty tuple = list no files
    folders: bool  # list sub-folders too (diffusers/transformers model folders)
    holds: str  # what a user puts there, for error messages and the README


MODEL_KINDS: dict[str, ModelKind] = {
    k.key: k
    for k in (
        ModelKind(
            "checkpoints", "checkpoints", WEIGHT_EXTENSIONS, False, "single-file SD1.5/SDXL checkpoints"
        ),
        ModelKind("diffusers", "diffusers", (), True, "diffusers model folders (model_index.json inside)"),
        ModelKind(
            "controlnet", "controlnet", WEIGHT_EXTENSIONS, True, "ControlNet weights or diffusers folders"
        ),
        ModelKind("text_encoders", "text_encoders", WEIGHT_EXTENSIONS, True, "CLIP text encoders"),
        ModelKind(
            "sams",
            "sams",
            (".pth", ".pt", ".safetensors"),
            False,
            "segment-anything checkpoints (sam_vit_b/l/h)",
        ),
        ModelKind(
            "facedetection",
            "facedetection",
            (".pth", ".onnx", ".dat", ".safetensors"),
            False,
            "face detectors: RetinaFace .pth (facexlib names), YuNet .onnx, dlib .dat",
        ),
        ModelKind("LLM", "LLM", (), True, "transformers folders of BLIP-2 / LLaVA captioning models"),
        ModelKind("depthanything", "depthanything", (), True, "transformers folders of Depth-Anything"),
        ModelKind(
            "priorface_llvfsr", "priorface/llvfsr", (".safetensors",), False, "PriorFace LLV-FSR weights"
        ),
        ModelKind(
            "priorface_xpsr",
            "priorface/xpsr",
            (".safetensors",),
            True,
            "XPSR checkpoint folders (unet/, controlnet/)",
        ),
        ModelKind(
            "priorface_authface", "priorface/authface", (".safetensors",), True, "AuthFace ControlNet weights"
        ),
        ModelKind(
            "priorface_vspbfr",
            "priorface/vspbfr",
            (".pt", ".pth", ".safetensors"),
            False,
            "VSPBFR checkpoints (style_encoder_decoder.pt, code_diffuser.pt, restoration_net.pt)",
        ),
        ModelKind(
            "priorface_metrics",
            "priorface/metrics",
            (".pth", ".safetensors"),
            False,
            "metric networks (LPIPS v0.1 vgg.pth, VGG16 backbone)",
        ),
    )
}


class ModelFileNotFoundError(FileNotFoundError):
    """A model file or folder was not found; the message lists every folder that was searched."""

    def __init__(self, kind: ModelKind, name: str, searched: list[Path]):
        where = (
            "\n".join(f"  - {p}{'' if p.is_dir() else '  (does not exist)'}" for p in searched) or "  (none)"
        )
        super().__init__(
            f"model file {name!r} not found for '{kind.key}' ({kind.holds}).\n"
            f"Searched:\n{where}\n"
            f"Put it in ComfyUI's models/{kind.subdir}/ folder, or add a '{kind.key}' entry to "
            f"extra_model_paths.yaml (headless: --models-dir or {MODELS_DIR_ENV})."
        )
        self.kind, self.name, self.searched = kind, name, searched


def get_kind(key: str) -> ModelKind:
    """Return the registered kind for a folder key, with a clear error for an unknown key."""
    try:
        return MODEL_KINDS[key]
    except KeyError:
        raise ValueError(f"unknown model folder kind {key!r}; known: {sorted(MODEL_KINDS)}") from None


class ModelLocator:
    """Lists and resolves model files of each kind in the folders ``dirs_for(key)`` returns."""

    def __init__(self, dirs_for: Callable[[str], Iterable[str | os.PathLike]]):
        self._dirs_for = dirs_for

    def search_dirs(self, key: str) -> list[Path]:
        """Folders searched for this kind, in priority order, duplicates removed."""
        get_kind(key)
        seen: list[Path] = []
        for d in self._dirs_for(key):
            p = Path(d).expanduser()
            if p not in seen:
                seen.append(p)
        return seen

    def list(self, key: str) -> list[str]:
        """Names (relative to their folder, '/'-separated) of the files and model folders found."""
        kind = get_kind(key)
        names: set[str] = set()
        for root in self.search_dirs(key):
            if root.is_dir():
                names.update(_scan(root, kind))
        return sorted(names, key=str.lower)

    def resolve(self, key: str, name: str) -> Path:
        """Absolute path of ``name`` in the first folder that has it, else ModelFileNotFoundError."""
        kind = get_kind(key)
        if not name or not name.strip():
            raise ValueError(f"no model selected for '{key}' ({kind.holds}); pick one in the node")
        rel = Path(name)
        if rel.is_absolute() and rel.exists():
            return rel
        if ".." in rel.parts:
            raise ValueError(f"model name {name!r} must stay inside the model folders")
        searched = self.search_dirs(key)
        for root in searched:
            candidate = root / rel
            if candidate.exists():
                return candidate
        raise ModelFileNotFoundError(kind, name, searched)


def _scan(root: Path, kind: ModelKind) -> set[str]:
    """Weight files (recursively) and, for folder kinds, model folders (their config marks them)."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if kind.folders and here != root and _is_model_folder(here):
            found.add(here.relative_to(root).as_posix())
            dirnames[:] = []  # a model folder's insides are not separate models
            continue
        for f in filenames:
            if kind.extensions and f.lower().endswith(kind.extensions):
                found.add((here / f).relative_to(root).as_posix())
    return found


def _is_model_folder(path: Path) -> bool:
    return any((path / marker).is_file() for marker in ("config.json", "model_index.json"))


def _default_models_dir() -> Path | None:
    value = os.environ.get(MODELS_DIR_ENV)
    return Path(value).expanduser() if value else None


def parse_extra_model_paths(yaml_path: str | os.PathLike) -> dict[str, list[Path]]:
    """Read a ComfyUI ``extra_model_paths.yaml`` into {folder key: [folders]} as ComfyUI does."""
    import yaml  # lazy: only headless runs with such a file need it

    yaml_path = Path(yaml_path).expanduser()
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"extra model paths file not found: {yaml_path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{yaml_path} is not valid YAML: {e}") from None
    result: dict[str, list[Path]] = {}
    for section in config.values():
        if not isinstance(section, dict):
            continue
        base = section.get("base_path")
        base_path = Path(os.path.expandvars(str(base))).expanduser() if base else None
        if base_path is not None and not base_path.is_absolute():
            base_path = (yaml_path.parent / base_path).resolve()
        for key, value in section.items():
            if key in ("base_path", "is_default") or value is None:
                continue
            key = LEGACY_KEYS.get(key, key)
            for line in str(value).splitlines():
                line = line.strip()
                if not line:
                    continue
                p = Path(os.path.expandvars(line)).expanduser()
                if not p.is_absolute():
                    # Like ComfyUI: relative to base_path, or to the YAML file's folder without one.
                    p = (base_path if base_path is not None else yaml_path.parent.resolve()) / p
                result.setdefault(key, []).append(p)
    return result


def headless_locator(
    models_dir: str | os.PathLike | None = None, extra_model_paths: str | os.PathLike | None = None
) -> ModelLocator:
    """Locator over a ComfyUI-style models folder and an optional extra_model_paths.yaml."""
    root = Path(models_dir).expanduser() if models_dir else _default_models_dir()
    extra_file = extra_model_paths or os.environ.get(EXTRA_PATHS_ENV)
    extra = parse_extra_model_paths(extra_file) if extra_file else {}

    def dirs_for(key: str) -> list[Path]:
        dirs = [root / MODEL_KINDS[key].subdir] if root is not None else []
        return dirs + extra.get(key, [])

    return ModelLocator(dirs_for)


def describe_folders(locator: ModelLocator, keys: Iterable[str] | None = None) -> str:
    """Text listing, per model kind, the folders searched and the files found there."""
    lines = []
    for key in keys if keys is not None else MODEL_KINDS:
        kind = get_kind(key)
        lines.append(f"[{key}] {kind.holds}")
        folders = locator.search_dirs(key)
        lines.extend(f"  folder: {d}{'' if d.is_dir() else '  (missing)'}" for d in folders)
        if not folders:
            lines.append(f"  (no folder configured: use --models-dir or {MODELS_DIR_ENV})")
        found = locator.list(key)
        lines.extend(f"  - {name}" for name in found)
        if folders and not found:
            lines.append("  (no files found)")
    return "\n".join(lines)
