"""Cached prior files for LLV-FSR training: check a folder once, then batch its priors per step.

The files are those of ``priorface priors`` (``inference.priors.batch``; format in
``inference.priors.bundle_io``): one ``<stem>.safetensors`` per face. Only their safetensors headers
are read by :func:`scan_prior_files` (cheap even for 10,000 faces), which checks that every face has
a complete file, that all files hold the selected priors from the same extractors with the same
shapes, and that they were computed from the LQ face of the training degradation. What it finds
(extractor records, mask classes, text width) sets the model config and the ``trained_with`` record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..inference.priors.bundle import TextEmbedding
from ..inference.priors.bundle_io import collate_prior_items, present_in_file, read_prior_header

log = logging.getLogger(__name__)

# LLV-FSR forward argument -> prior name in the files (and in trained_with)
FILE_PRIOR = {
    "mask": "mask",
    "depth": "depth",
    "caption": "caption_embedding",
    "description": "description_embedding",
}
_EMB_PARTS = ("tokens", "attention_mask", "pooled")
_EXAMPLE = "priorface priors FACES --out DIR --size SIZE --degradation MODE --template TEMPLATE"


@dataclass
class CachedPriors:
    """What a folder of prior files holds for the selected priors (identical in every file)."""

    folder: Path
    sources: dict[str, dict]  # file prior name -> provenance record ({"extractor": id, ...})
    shapes: dict[str, list[int]]  # tensor name -> shape (token tensors: width only)
    run: dict  # the batch run's degradation / seed / size / template

    @property
    def mask_classes(self) -> int | None:
        """Channels K of the one-hot mask, None without a mask."""
        return self.shapes["mask"][0] if "mask" in self.shapes else None

    @property
    def text_dim(self) -> int | None:
        """Width D of the text embeddings (None without any); caption and description must agree."""
        widths = {self.shapes[f"{n}.tokens"][-1] for n in FILE_PRIOR.values() if f"{n}.tokens" in self.shapes}
        if len(widths) > 1:
            raise ValueError(
                f"the prior files in {self.folder} hold text embeddings of different widths {sorted(widths)}; "
                "LLV-FSR has one text width: embed caption and description with the same text encoder"
            )
        return widths.pop() if widths else None


def _signature(keys: dict[str, dict], wanted: list[str]) -> dict[str, list[int]]:
    """Shapes that must agree between files (token counts differ per text and are left out)."""
    out = {}
    for name in wanted:
        if name in ("mask", "depth"):
            out[name] = list(keys[name]["shape"])
        else:
            out[f"{name}.tokens"] = [keys[f"{name}.tokens"]["shape"][-1]]
    return out


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def scan_prior_files(
    folder: str | Path, stems: list[str], priors: list[str], degradation: str, size: int
) -> CachedPriors:
    """Check the prior files of ``stems`` (see module docstring); raise naming the first bad file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"prior folder {folder} not found; make it first: {_EXAMPLE}")
    wanted = [FILE_PRIOR[p] for p in priors]
    ref: CachedPriors | None = None
    ref_path: Path | None = None
    missing = []
    for stem in stems:
        path = folder / f"{stem}.safetensors"
        header = read_prior_header(path)
        if header is None:
            missing.append(path)
            continue
        keys, meta = header
        lacking = sorted(set(wanted) - present_in_file(keys, meta))
        if lacking:
            raise ValueError(
                f"{path} has no {lacking} prior(s) (it holds {sorted(present_in_file(keys, meta))}); "
                "extract them, or leave them out of the task's 'priors'"
            )
        sources = {n: meta.get("sources", {}).get(n, {}) for n in wanted}
        unnamed = [n for n, s in sources.items() if not s.get("extractor")]
        if unnamed:
            raise ValueError(f"{path} records no extractor for {unnamed}; a model cannot be tied to them")
        found = CachedPriors(folder, sources, _signature(keys, wanted), meta.get("extra", {}).get("run", {}))
        if ref is None:
            ref, ref_path = found, path
            continue
        for what in ("sources", "shapes", "run"):
            if _as_json(getattr(found, what)) != _as_json(getattr(ref, what)):
                raise ValueError(
                    f"mixed prior files: {path} has {what} {getattr(found, what)} but {ref_path} has "
                    f"{getattr(ref, what)}; extract every face's priors with the same extractors and settings"
                )
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} face(s) have no complete prior file, e.g. {[str(p) for p in missing[:3]]}; "
            f"extract them (a rerun resumes): {_EXAMPLE}"
        )
    if ref is None:
        raise ValueError(f"no faces to read priors for from {folder}")
    run_degradation = ref.run.get("degradation")
    if run_degradation != degradation:
        raise ValueError(
            f"the priors in {folder} were computed from faces degraded by {run_degradation!r}, but this "
            f"task trains on {degradation!r}; LLV-FSR sees priors of the LQ face at inference, so extract "
            f"them with --degradation {degradation}"
        )
    if ref.run.get("size") != size:
        log.warning(
            "priors in %s were computed at size %s, the task's faces are %d px: geometry may differ",
            folder,
            ref.run.get("size"),
            size,
        )
    return ref


def cached_forward_kwargs(items: list[dict[str, torch.Tensor]], priors: list[str], device) -> dict[str, Any]:
    """LLV-FSR forward kwargs (mask, depth, caption, description) from the prior dicts of a batch."""
    kwargs: dict[str, Any] = {}
    for arg in priors:
        name = FILE_PRIOR[arg]
        if arg in ("mask", "depth"):
            kwargs[arg] = torch.stack([it[name] for it in items]).float().to(device)
            continue
        keys = [f"{name}.{part}" for part in _EMB_PARTS]
        batch = collate_prior_items([{k: it[k] for k in keys} for it in items])
        kwargs[arg] = TextEmbedding(*(batch[k].to(device) for k in keys))
    return kwargs
