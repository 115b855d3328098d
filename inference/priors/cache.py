"""Disk cache of priors, one file per face and extractor, keyed by what was fed to the extractor.

Key: SHA-256 over the content (an image quantised to 8 bits plus its shape, or a text's UTF-8),
the extractor id and its settings as sorted JSON. Two runs on the same face with the same
extractor and settings share an entry; any change of pixels (beyond 8-bit rounding), extractor
or settings makes a new one. Entries are prior files (``bundle_io``), written atomically, under
``<folder>/<extractor id>/<2 hex>/<key>.safetensors``. The folder is ``$PRIORFACE_CACHE_DIR`` or
``~/.cache/priorface/priors``. Nothing is ever evicted: delete the folder to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ...models.checkpoint import CheckpointError
from .bundle import PriorBundle
from .bundle_io import concat_bundles, read_prior_file, select_bundle, write_prior_file

log = logging.getLogger(__name__)

CACHE_ENV = "PRIORFACE_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$PRIORFACE_CACHE_DIR``, else ``~/.cache/priorface/priors``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "priorface" / "priors"


def image_digest(image: torch.Tensor) -> str:
    """SHA-256 of one CHW image in [0,1] quantised to uint8, with its shape."""
    if image.dim() != 3:
        raise ValueError(f"expected one CHW image, got shape {tuple(image.shape)}")
    q = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().contiguous()
    h = hashlib.sha256(f"image:{tuple(q.shape)}:".encode())
    h.update(q.numpy().tobytes())
    return h.hexdigest()


def text_digest(text: str) -> str:
    """SHA-256 of a text's UTF-8 bytes."""
    return hashlib.sha256(b"text:" + text.encode("utf-8")).hexdigest()


def cache_key(content_digest: str, extractor_id: str, settings: dict) -> str:
    """Entry key: content digest + extractor id + settings (sorted JSON)."""
    blob = json.dumps([content_digest, extractor_id, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class PriorCache:
    """Per-face prior cache on disk; ``enabled=False`` computes everything and stores nothing."""

    def __init__(self, folder: str | os.PathLike | None = None, enabled: bool = True):
        self.folder = Path(folder).expanduser() if folder else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path_for(self, key: str, extractor_id: str) -> Path:
        """Where the entry of ``key`` lives."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor_id)
        return self.folder / safe / key[:2] / f"{key}.safetensors"

    def _load(self, path: Path) -> PriorBundle | None:
        if not path.is_file():
            return None
        try:
            return read_prior_file(path)[0]
        except (CheckpointError, ValueError, OSError, KeyError) as e:
            # A damaged entry is recomputed and overwritten, never fatal.
            log.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None

    def _get_or_compute(self, digests, items, extractor_id, settings, compute_fn, stack) -> PriorBundle:
        if not self.enabled:
            return self._checked(compute_fn(stack(items)), len(items), extractor_id)
        paths = [self.path_for(cache_key(d, extractor_id, settings), extractor_id) for d in digests]
        found = [self._load(p) for p in paths]
        missing = [i for i, b in enumerate(found) if b is None]
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = self._checked(
                compute_fn(stack([items[i] for i in missing])), len(missing), extractor_id
            )
            for j, i in enumerate(missing):
                found[i] = select_bundle(computed, [j])
                try:
                    write_prior_file(paths[i], computed, j, durable=False)
                except OSError as e:  # a full or read-only cache folder must not stop extraction
                    log.warning("could not write cache entry %s: %s", paths[i], e)
        return concat_bundles(found)

    @staticmethod
    def _checked(bundle: PriorBundle, n: int, extractor_id: str) -> PriorBundle:
        if not isinstance(bundle, PriorBundle) or bundle.batch_size != n:
            got = getattr(bundle, "batch_size", type(bundle).__name__)
            raise ValueError(f"extractor {extractor_id!r} returned priors for {got} face(s), expected {n}")
        return bundle

    def get_or_compute(
        self,
        images: torch.Tensor,
        extractor_id: str,
        settings: dict,
        compute_fn: Callable[[torch.Tensor], PriorBundle],
    ) -> PriorBundle:
        """Priors of a BCHW batch: cached faces are read, ``compute_fn`` runs on the others only."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B,C,H,W], got {tuple(images.shape)}")
        items = list(images)
        digests = [image_digest(x) for x in items] if self.enabled else []
        return self._get_or_compute(digests, items, extractor_id, settings, compute_fn, torch.stack)

    def get_or_compute_texts(
        self,
        texts: list[str],
        extractor_id: str,
        settings: dict,
        compute_fn: Callable[[list[str]], PriorBundle],
    ) -> PriorBundle:
        """Priors of a list of texts (e.g. embeddings), cached per text like images are."""
        digests = [text_digest(t) for t in texts] if self.enabled else []
        return self._get_or_compute(digests, list(texts), extractor_id, settings, compute_fn, list)
