"""XPSR training data: face pairs from FaceDataset plus the high- and low-level prompt of each face.

Prompt texts come, per face, from a folder holding either ``<stem>.txt`` files (the official layout:
``highlevel_prompt/<name>.txt``, ``lowlevel_prompt_q/<name>.txt``) or PriorFace prior files
``<stem>.safetensors`` (written by ``priorface`` prior extraction, e.g. the ``xpsr_high``/``xpsr_low``
LLaVA presets, which fill ``prompt_high``/``prompt_low``); ``<stem>`` is the face's path relative to
its image folder, without suffix. Without a folder every face gets the fixed text. The content-
addressed prior cache (inference/priors/cache.py) cannot serve here: its entries are keyed by the
exact pixels fed to the extractor, not by file name, so extract into a folder first.

Official ``original_image_ratio`` (0.1): with that probability the control image is the HR face itself
and the low-level prompt is the HR face's own description (``lowlevel_prompt_q_GT``). The draw is
seeded by (seed, epoch, index), so resumed runs see the same substitutions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .datasets import FaceDataset

log = logging.getLogger(__name__)

PROMPT_SUFFIXES = (".txt", ".safetensors")


class PromptLookup:
    """Per-face texts from a folder of ``.txt`` or prior files (``prior`` names the field), else ``fixed``."""

    def __init__(self, folder: str | None, prior: str, fixed: str = "", required: bool = True):
        self.folder = Path(folder) if folder else None
        self.prior, self.fixed, self.required = prior, fixed, required
        self._texts: dict[str, str] = {}
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(f"prompt folder not found: {self.folder} (expected .txt or prior files)")

    def path_for(self, stem: str) -> Path | None:
        """The file holding ``stem``'s text, or None."""
        if self.folder is None:
            return None
        return next((p for s in PROMPT_SUFFIXES if (p := self.folder / f"{stem}{s}").is_file()), None)

    def check(self, stems: list[str]) -> list[str]:
        """Stems without a text file (raises FileNotFoundError when texts are required)."""
        if self.folder is None:
            return []
        missing = [s for s in stems if self.path_for(s) is None]
        if missing and self.required:
            raise FileNotFoundError(
                f"{len(missing)} face(s) have no {self.prior} text in {self.folder}, e.g. {missing[:3]}; "
                f"expected <stem>.txt or <stem>.safetensors (prior file) per face"
            )
        if missing:
            log.warning(
                "%d face(s) lack a %s text in %s; using the fixed text", len(missing), self.prior, self.folder
            )
        return missing

    def __call__(self, stem: str) -> str:
        """The text of face ``stem``."""
        if stem not in self._texts:
            self._texts[stem] = self._read(stem)
        return self._texts[stem]

    def _read(self, stem: str) -> str:
        path = self.path_for(stem)
        if path is None:
            if self.folder is not None and self.required:
                raise FileNotFoundError(f"no {self.prior} text for {stem!r} in {self.folder}")
            return self.fixed
        if path.suffix == ".txt":
            return " ".join(path.read_text(encoding="utf-8").split())
        from ..inference.priors.bundle_io import read_prior_file

        bundle, _ = read_prior_file(path)
        texts = getattr(bundle, self.prior)
        if not texts:
            raise ValueError(f"prior file {path} holds no {self.prior!r}; present: {bundle.present()}")
        return " ".join(texts[0].split())


class XPSRPairs:
    """FaceDataset items plus ``prompt_high``/``prompt_low`` texts and the HR-as-control substitution."""

    def __init__(
        self,
        faces: FaceDataset,
        high: PromptLookup,
        low: PromptLookup,
        hq_low: PromptLookup | None = None,
        hq_control_ratio: float = 0.0,
    ):
        if not 0.0 <= hq_control_ratio <= 1.0:
            raise ValueError(f"hq_control_ratio must be in [0, 1], got {hq_control_ratio}")
        self.faces, self.high, self.low, self.hq_low = faces, high, low, hq_low
        self.hq_control_ratio = hq_control_ratio
        stems = [str(Path(rel).with_suffix("")) for _p, rel in faces.files]
        for lookup in (high, low) + ((hq_low,) if hq_low and hq_control_ratio > 0 else ()):
            lookup.check(stems)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the degradation draws and substitutions."""
        self.faces.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> dict:
        item = self.faces[index]
        stem = item["name"]
        item["prompt_high"], item["prompt_low"] = self.high(stem), self.low(stem)
        item["hq_control"] = False
        if self.hq_control_ratio > 0:
            rng = np.random.default_rng([self.faces.config.seed, self.faces.epoch, index, 0x5E])
            if rng.random() < self.hq_control_ratio:
                item["lq"] = item["hq"].clone()
                item["prompt_low"] = self.hq_low(stem) if self.hq_low else ""
                item["hq_control"] = True
        return item
