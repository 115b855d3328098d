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

Extractors: the embedded ones (``EMBEDDED_PRIORS``), the model-backed ones of
:mod:`.batch_models` (SAM, Depth-Anything, BLIP-2, LLaVA, CLIP text; their model paths come in
``models``), and any registered with :func:`register_extractor`. Two extractors may not set the
same prior. Extractors that read priors (a text encoder embedding the caption) run after the
others; a caption/description they need but nobody extracts is the embedded template text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ...models.checkpoint import write_atomically
from ..images import IMAGE_SUFFIXES, list_images, load_image_file, resize_bchw
from ..progress import progress_bar
from .batch_models import MODEL_EXTRACTORS, ExtraExtractor, ModelOptions, build_model_extractors
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
_TEXT_OF = {"caption_embedding": "caption", "description_embedding": "description"}
__all__ = ["ExtraExtractor", "ModelOptions", "extract_priors_for_folder", "register_extractor"]


EXTRA_EXTRACTORS: dict[str, ExtraExtractor] = {}


def register_extractor(name: str, extractor: ExtraExtractor) -> None:
    """Make ``name`` usable in ``extractors=[...]`` and ``--extractors``."""
    if name in EMBEDDED_PRIORS or name in MODEL_EXTRACTORS:
        raise ValueError(f"{name!r} is a built-in extractor name; choose another")
    EXTRA_EXTRACTORS[name] = extractor


def extractor_names() -> list[str]:
    """Every name accepted in ``extractors``."""
    return [*EMBEDDED_PRIORS, *MODEL_EXTRACTORS, *EXTRA_EXTRACTORS]


def file_seed(seed: int, relative_name: str) -> int:
    """Degradation seed of one file: depends on the run's seed and the file's relative name only."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{relative_name}".encode()).digest()[:4], "big")


def _check_overlap(extractors: Sequence[str], registry: Mapping[str, ExtraExtractor]) -> None:
    """Refuse two extractors setting one prior (e.g. mask and sam_mask): the file can hold one."""
    setter: dict[str, str] = {}
    for name in extractors:
        for prior in registry[name].priors if name in registry else (name,):
            if prior in setter:
                raise ValueError(
                    f"extractors {setter[prior]!r} and {name!r} both set the {prior!r} prior; keep one"
                )
            setter[prior] = name


def _expected(
    extractors: Sequence[str], registry: Mapping[str, ExtraExtractor], text_encoder
) -> tuple[dict[str, str | None], dict[str, dict]]:
    """(prior name -> extractor id a complete file must record, None: presence only; -> settings)."""
    ids: dict[str, str | None] = {}
    settings: dict[str, dict] = {}
    for name in extractors:
        if name in registry:
            ex = registry[name]
            ids.update(dict.fromkeys(ex.priors, ex.extractor_id))
            if ex.settings:
                settings.update(dict.fromkeys(ex.priors, ex.settings))
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
    return ids, settings


def _same(a, b) -> bool:
    # Compared as JSON: a file read back holds lists where tuples were written.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _is_complete(path: Path, expected: dict[str, str | None], settings: dict[str, dict], run: dict) -> bool:
    header = read_prior_header(path)
    if header is None:
        return False
    keys, meta = header
    if not set(expected) <= present_in_file(keys, meta):
        return False
    sources = meta.get("sources", {})
    if any(want is not None and sources.get(n, {}).get("extractor") != want for n, want in expected.items()):
        return False
    for n, want in settings.items():
        have = sources.get(n, {}).get("settings", {})
        if not all(_same(have.get(k), v) for k, v in want.items()):
            return False
    return {k: meta.get("extra", {}).get("run", {}).get(k) for k in run} == run


def _extract(images, labels, extractors, registry, text_encoder, template, cache) -> PriorBundle:
    """All requested priors of one batch: plugged-in extractors, embedded ones, then readers of priors."""
    bundle = PriorBundle(batch_size=images.shape[0])
    plugged = [registry[n] for n in extractors if n in registry]
    for ex in plugged:
        if not ex.needs:
            bundle = merge_bundles(bundle, ex.fn(images, labels))
    embeddings = [n for n in extractors if n in _EMBEDDINGS]
    needed = {_TEXT_OF[n] for n in embeddings} | {p for ex in plugged for p in ex.needs}
    wanted = [n for n in extractors if n in EMBEDDED_PRIORS and n not in _EMBEDDINGS]
    wanted += sorted(
        p
        for p in needed - set(wanted)
        if p in EMBEDDED_PRIORS and p not in _EMBEDDINGS and getattr(bundle, p) is None
    )
    if wanted:
        embedded = extract_embedded_priors(images, wanted, labels=labels, cache=cache, template=template)
        bundle = merge_bundles(embedded, bundle)  # plugged-in priors win (e.g. a BLIP-2 caption)
    for ex in plugged:
        if ex.needs:
            bundle = merge_bundles(bundle, ex.fn(images, labels, bundle))
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
    models: ModelOptions | None = None,
) -> dict:
    """Write one prior file per image of ``source_dir`` (see module docstring); returns a summary.

    ``models``: model paths and settings of the model-backed extractors (``batch_models``).
    """
    extractors = list(dict.fromkeys(extractors))
    unknown = sorted(set(extractors) - set(extractor_names()))
    if unknown or not extractors:
        raise ValueError(
            f"unknown extractor(s) {unknown or list(extractors)}; expected some of {extractor_names()}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Model paths are checked before any face is read; registered extractors of the same name win.
    own = [n for n in extractors if n not in EXTRA_EXTRACTORS]
    registry = {**build_model_extractors(own, models or ModelOptions(), template), **EXTRA_EXTRACTORS}
    _check_overlap(extractors, registry)
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
    expected, settings = _expected(extractors, registry, text_encoder)
    target = {rel: out / f"{Path(rel).with_suffix('').as_posix()}.safetensors" for _p, rel in files}
    pending = [
        (p, rel) for p, rel in files if overwrite or not _is_complete(target[rel], expected, settings, run)
    ]
    log.info(
        "priors for %d image(s): %d already done, %d to extract",
        len(files),
        len(files) - len(pending),
        len(pending),
    )
    with progress_bar(len(pending), "Extracting priors") as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            _process_chunk(chunk, target, extractors, registry, run, text_encoder, labels_fn, cache)
            bar.update(len(chunk))
    index = _write_index(out, src, files, target, list(extractors), run)
    return {
        "images": len(files),
        "extracted": len(pending),
        "skipped": len(files) - len(pending),
        "index": str(index),
    }


def _process_chunk(chunk, target, extractors, registry, run, text_encoder, labels_fn, cache) -> None:
    loaded = [_load(p, rel, run["size"], run["degradation"], run["seed"] or 0) for p, rel in chunk]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (image, _params) in enumerate(loaded):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    for members in by_size.values():  # a batch needs one size; folders may mix sizes
        images = torch.cat([loaded[i][0] for i in members])
        labels = [labels_fn(chunk[i][1]) if labels_fn else None for i in members]
        bundle = _extract(images, labels, extractors, registry, text_encoder, run["template"], cache)
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
