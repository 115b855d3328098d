"""Extract priors for a whole folder of aligned faces, one prior file per image, resumable.

``extract_priors_for_folder(src, out, extractors)`` writes ``<out>/<relative stem>.safetensors``
(the layout ``FaceDataset(priors_dir=out)`` reads; format in :mod:`.bundle_io`) and
``<out>/priors_index.json``. Files are written atomically, so Ctrl-C never leaves a half file; a
rerun skips every image whose file is complete (its safetensors header is read and checked: length,
requested priors, extractor ids, and the run's degradation/seed/size) and redoes the rest.

With ``degradation`` (a mode of ``inference.degradations``) the priors are computed from the
degraded (LQ) face, resized back to the HQ size, as LLV-FSR computes its priors from the LR input at
inference; each image is degraded with a seed derived from ``seed`` and its relative name, so
adding files never changes the others. Without it, priors come from the images as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...models.checkpoint import write_atomically
from ..images import IMAGE_SUFFIXES, list_images, load_image_file, resize_bchw
from ..progress import progress_bar
from .bundle import PriorBundle
from .bundle_io import merge_bundles, present_in_file, read_prior_header, write_prior_file
from .cache import PriorCache
from .captions import CAPTION_EXTRACTOR_ID, DESCRIPTION_EXTRACTOR_ID
from .embedded import DETECTED_LANDMARKS_ID, EMBEDDED_PRIORS, embed_texts, extract_embedded_priors
from .landmark_mask import MASK_EXTRACTOR_ID
from .text_encoder import encoder_identity

log = logging.getLogger(__name__)

INDEX_NAME = "priors_index.json"
_EMBEDDINGS = ("caption_embedding", "description_embedding")


@dataclass
class ExtraExtractor:
    """A prior extractor plugged in by name (e.g. BLIP-2, SAM, depth): faces + labels -> bundle."""

    fn: Callable[[torch.Tensor, list[dict | None]], PriorBundle]
    priors: tuple[str, ...]  # prior names it sets
    extractor_id: str | None = None  # id recorded in its sources, checked on resume when known


EXTRA_EXTRACTORS: dict[str, ExtraExtractor] = {}


def register_extractor(name: str, extractor: ExtraExtractor) -> None:
    """Make ``name`` usable in ``extractors=[...]`` and ``--extractors``."""
    if name in EMBEDDED_PRIORS:
        raise ValueError(f"{name!r} is a built-in extractor name; choose another")
    EXTRA_EXTRACTORS[name] = extractor


def extractor_names() -> list[str]:
    """Every name accepted in ``extractors``."""
    return [*EMBEDDED_PRIORS, *EXTRA_EXTRACTORS]


def file_seed(seed: int, relative_name: str) -> int:
    """Degradation seed of one file: depends on the run's seed and the file's relative name only."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{relative_name}".encode()).digest()[:4], "big")


def _expected_ids(extractors: Sequence[str], text_encoder) -> dict[str, str | None]:
    """Prior name -> extractor id a complete file must record (None: only presence is checked)."""
    ids: dict[str, str | None] = {}
    for name in extractors:
        if name in EXTRA_EXTRACTORS:
            ids.update(dict.fromkeys(EXTRA_EXTRACTORS[name].priors, EXTRA_EXTRACTORS[name].extractor_id))
    builtin = {
        "mask": MASK_EXTRACTOR_ID,
        "landmarks": DETECTED_LANDMARKS_ID,
        "caption": ids.get("caption", CAPTION_EXTRACTOR_ID),
        "description": ids.get("description", DESCRIPTION_EXTRACTOR_ID),
    }
    for name in extractors:
        if name in _EMBEDDINGS:
            ids[name] = encoder_identity(text_encoder)[0]
        elif name in builtin:
            ids[name] = builtin[name]
    return ids


def _is_complete(path: Path, expected: dict[str, str | None], run: dict) -> bool:
    header = read_prior_header(path)
    if header is None:
        return False
    keys, meta = header
    if not set(expected) <= present_in_file(keys, meta):
        return False
    sources = meta.get("sources", {})
    if any(want is not None and sources.get(n, {}).get("extractor") != want for n, want in expected.items()):
        return False
    return {k: meta.get("extra", {}).get("run", {}).get(k) for k in run} == run


def _extract(images, labels, extractors, text_encoder, template, cache) -> PriorBundle:
    """All requested priors of one batch: plugged-in extractors first, then the embedded ones."""
    bundle = PriorBundle(batch_size=images.shape[0])
    for name in extractors:
        if name in EXTRA_EXTRACTORS:
            bundle = merge_bundles(bundle, EXTRA_EXTRACTORS[name].fn(images, labels))
    embeddings = [n for n in extractors if n in _EMBEDDINGS]
    wanted = [n for n in extractors if n in EMBEDDED_PRIORS and n not in _EMBEDDINGS]
    wanted += [
        t for t in ("caption", "description") if f"{t}_embedding" in embeddings and getattr(bundle, t) is None
    ]
    if wanted:
        embedded = extract_embedded_priors(images, wanted, labels=labels, cache=cache, template=template)
        bundle = merge_bundles(embedded, bundle)  # plugged-in priors win (e.g. a BLIP-2 caption)
    if embeddings:
        bundle = embed_texts(bundle, embeddings, text_encoder, cache)
    return bundle


def _load(path: Path, rel: str, size: int | None, degradation: str | None, seed: int):
    image = load_image_file(path).unsqueeze(0)
    if size is not None:
        image = resize_bchw(image, size, size)
    if degradation is None:
        return image, None
    from ..degradations import degrade

    lq, params = degrade(image, degradation, file_seed(seed, rel), "input")
    return lq, params


def extract_priors_for_folder(
    source_dir: str | Path,
    out_dir: str | Path,
    extractors: Sequence[str] = ("mask", "caption", "caption_embedding"),
    degradation: str | None = None,
    seed: int = 0,
    size: int | None = None,
    template: str = "ffhq",
    text_encoder: str | Path | None = None,
    batch_size: int = 8,
    labels_fn: Callable[[str], dict | None] | None = None,
    cache: PriorCache | None = None,
    overwrite: bool = False,
) -> dict:
    """Write one prior file per image of ``source_dir`` (see module docstring); returns a summary."""
    unknown = sorted(set(extractors) - set(extractor_names()))
    if unknown or not extractors:
        raise ValueError(
            f"unknown extractor(s) {unknown or list(extractors)}; expected some of {extractor_names()}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    src, out = Path(source_dir).expanduser(), Path(out_dir).expanduser()
    files = list_images(src)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {src}")
    run = {
        "degradation": degradation,
        "seed": int(seed) if degradation else None,
        "size": size,
        "template": template,
    }
    expected = _expected_ids(extractors, text_encoder)
    target = {rel: out / f"{Path(rel).with_suffix('').as_posix()}.safetensors" for _p, rel in files}
    pending = [(p, rel) for p, rel in files if overwrite or not _is_complete(target[rel], expected, run)]
    log.info(
        "priors for %d image(s): %d already done, %d to extract",
        len(files),
        len(files) - len(pending),
        len(pending),
    )
    with progress_bar(len(pending), "Extracting priors") as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            _process_chunk(chunk, target, extractors, run, text_encoder, template, labels_fn, cache)
            bar.update(len(chunk))
    index = _write_index(out, src, files, target, list(extractors), run)
    return {
        "images": len(files),
        "extracted": len(pending),
        "skipped": len(files) - len(pending),
        "index": str(index),
    }


def _process_chunk(chunk, target, extractors, run, text_encoder, template, labels_fn, cache) -> None:
    loaded = [_load(p, rel, run["size"], run["degradation"], run["seed"] or 0) for p, rel in chunk]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (image, _params) in enumerate(loaded):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    for members in by_size.values():  # a batch needs one size; folders may mix sizes
        images = torch.cat([loaded[i][0] for i in members])
        labels = [labels_fn(chunk[i][1]) if labels_fn else None for i in members]
        bundle = _extract(images, labels, extractors, text_encoder, template, cache)
        for j, i in enumerate(members):
            rel = chunk[i][1]
            extra = {"source": rel, "run": run, "degradation": loaded[i][1]}
            write_prior_file(target[rel], bundle, j, extra)


def _write_index(out: Path, src: Path, files, target, extractors, run) -> Path:
    items, sources = {}, {}
    for _p, rel in files:
        header = read_prior_header(target[rel])
        meta = header[1] if header else {}
        sources = sources or meta.get("sources", {})
        items[Path(rel).with_suffix("").as_posix()] = {
            "file": target[rel].relative_to(out).as_posix(),
            "degradation": meta.get("extra", {}).get("degradation"),
        }
    index = {"source_dir": str(src), "extractors": extractors, "run": run, "sources": sources, "items": items}
    path = out / INDEX_NAME
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(index, indent=1, sort_keys=True)))
    return path
