"""The one place that talks to ComfyUI's own modules: model folders, progress, device, interrupts."""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as model_management
import comfy.utils
import folder_paths

from ..inference import progress
from ..inference.model_files import MODEL_KINDS, ModelLocator


def register_model_folders() -> None:
    """Add PriorFace's model folders to ``folder_paths``, extending (never replacing) existing keys."""
    for kind in MODEL_KINDS.values():
        default_dir = os.path.join(folder_paths.models_dir, *kind.subdir.split("/"))
        existed = kind.key in folder_paths.folder_names_and_paths
        folder_paths.add_model_folder_path(kind.key, default_dir)
        paths, extensions = folder_paths.folder_names_and_paths[kind.key]
        if not existed:
            # A key ComfyUI creates here has an empty extension set, which lists every file.
            folder_paths.folder_names_and_paths[kind.key] = (paths, set(kind.extensions))
        elif extensions and list(extensions) != ["folder"]:
            # ComfyUI shares one extension set between several keys: build a new one, never mutate.
            folder_paths.folder_names_and_paths[kind.key] = (paths, set(extensions) | set(kind.extensions))


def _dirs_for(key: str) -> list[str]:
    return list(folder_paths.get_folder_paths(key))


LOCATOR = ModelLocator(_dirs_for)


class _ComfyHandle:
    def __init__(self, total: int):
        self._bar = comfy.utils.ProgressBar(max(total, 1))
        self._total, self._done = max(total, 1), 0

    def update(self, n: int = 1, preview=None) -> None:
        self._done += n
        if preview is not None:
            self._bar.update_absolute(self._done, self._total, ("JPEG", preview, 512))
        else:
            self._bar.update(n)

    def close(self) -> None:
        pass


class ComfyProgressBackend:
    """Progress over ComfyUI's websocket; interruption through ComfyUI's ``/interrupt``."""

    def start(self, total: int, desc: str) -> _ComfyHandle:
        return _ComfyHandle(total)

    def check_interrupted(self) -> None:
        model_management.throw_exception_if_processing_interrupted()


def install() -> None:
    """Wire the library to ComfyUI; called once when the node package is imported."""
    register_model_folders()
    progress.set_backend(ComfyProgressBackend())


def output_directory() -> Path:
    """ComfyUI's output folder (``--output-directory`` respected)."""
    return Path(folder_paths.get_output_directory())


def torch_device():
    """The device ComfyUI chose for inference (respects --cpu, --gpu-only and friends)."""
    return model_management.get_torch_device()


def comfy_tokenizer_dirs() -> Path | None:
    """ComfyUI's own CLIP tokenizer folder (comfy/sd1_tokenizer), shared by both SDXL encoders, if present."""
    import comfy

    # One folder for both: load_sd_parts gives the second (CLIP-G) tokenizer its "!" padding itself.
    folder = Path(comfy.__file__).resolve().parent / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() else None
