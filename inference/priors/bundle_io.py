"""Bundle operations (select, concatenate, merge) and the one-file-per-face prior format.

A prior file is safetensors (written atomically) holding one face's priors, the format
``training.datasets.FaceDataset`` reads from ``priors_dir``:

- ``caption_embedding.tokens`` ``[T,D]`` float32 (real tokens only, no padding),
  ``caption_embedding.attention_mask`` ``[T]`` int64, ``caption_embedding.pooled`` ``[D]``; the same
  for ``description_embedding``;
- ``mask`` ``[K,H,W]`` uint8 one-hot (lossless for {0,1}, a quarter of float32's size);
- ``depth`` ``[1,H,W]`` float32; ``landmarks`` ``[5,2]`` float32.

Strings live in the metadata key ``priorface.priors`` (JSON: texts, mask_labels, sources, extra).
Token sequences differ in length between faces: batch them with :func:`collate_prior_items`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ...models.checkpoint import (
    ARCH_KEY,
    CONFIG_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    read_checkpoint,
    save_safetensors,
)
from .bundle import TENSOR_PRIORS, TEXT_PRIORS, PriorBundle, TextEmbedding

PRIOR_FILE_ARCHITECTURE = "priorface-priors"
PRIORS_META_KEY = "priorface.priors"
_EMBEDDINGS = ("caption_embedding", "description_embedding")
_EMB_PARTS = ("tokens", "attention_mask", "pooled")


def select_bundle(bundle: PriorBundle, index: list[int]) -> PriorBundle:
    """The priors of some faces of a bundle, in the order of ``index``."""
    out = PriorBundle(batch_size=len(index), mask_labels=bundle.mask_labels, sources=dict(bundle.sources))
    for name in bundle.present():
        value = getattr(bundle, name)
        if isinstance(value, list):
            value = [value[i] for i in index]
        elif isinstance(value, TextEmbedding):
            value = value.select(index)
        else:
            value = value[index]
        out = replace(out, **{name: value})
    return out


def _pad_t(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the token axis (dim 1) of [B,T] or [B,T,D] with zeros up to ``length``."""
    pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
    return torch.nn.functional.pad(t, pad)


def concat_embeddings(parts: list[TextEmbedding]) -> TextEmbedding:
    """Concatenate text embeddings along the batch, padding token sequences to the longest."""
    length = max(p.tokens.shape[1] for p in parts)
    return TextEmbedding(
        torch.cat([_pad_t(p.tokens, length) for p in parts]),
        torch.cat([_pad_t(p.attention_mask, length) for p in parts]),
        torch.cat([p.pooled for p in parts]),
    )


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def concat_bundles(bundles: list[PriorBundle]) -> PriorBundle:
    """One bundle from several with the same priors from the same extractors, batches concatenated."""
    if not bundles:
        raise ValueError("no bundles to concatenate")
    first = bundles[0]
    for b in bundles[1:]:
        # Sources compared as JSON: bundles read back from prior files hold lists where tuples were.
        same_sources = _as_json(b.sources) == _as_json(first.sources)
        if b.present() != first.present() or not same_sources or b.mask_labels != first.mask_labels:
            raise ValueError(
                f"cannot batch priors of different kinds: {first.present()} from {first.sources} and "
                f"{b.present()} from {b.sources}; extract the same priors with the same extractors"
            )
    out = PriorBundle(batch_size=sum(b.batch_size for b in bundles), mask_labels=first.mask_labels)
    out = replace(out, sources=dict(first.sources))
    for name in first.present():
        values = [getattr(b, name) for b in bundles]
        if isinstance(values[0], list):
            value = [v for part in values for v in part]
        elif isinstance(values[0], TextEmbedding):
            value = concat_embeddings(values)
        else:
            value = torch.cat(values)
        out = replace(out, **{name: value})
    return out


def merge_bundles(first: PriorBundle, second: PriorBundle) -> PriorBundle:
    """Priors of both bundles; where both hold a prior, the second one's (with its source) wins."""
    if first.batch_size != second.batch_size:
        raise ValueError(
            f"cannot merge priors of {first.batch_size} face(s) with priors of {second.batch_size} face(s)"
        )
    out = first
    for name in second.present():
        out = out.with_prior(name, getattr(second, name), second.sources.get(name, {}))
    if second.mask is not None:
        out = replace(out, mask_labels=second.mask_labels)
    return out


def _real_length(mask: torch.Tensor) -> int:
    nonzero = torch.nonzero(mask).flatten()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def item_tensors(bundle: PriorBundle, i: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON-able metadata of face ``i`` of a bundle, in the prior-file layout."""
    tensors: dict[str, torch.Tensor] = {}
    for name in _EMBEDDINGS:
        emb = getattr(bundle, name)
        if emb is not None:
            n = _real_length(emb.attention_mask[i])
            tensors[f"{name}.tokens"] = emb.tokens[i, :n].float()
            tensors[f"{name}.attention_mask"] = emb.attention_mask[i, :n].long()
            tensors[f"{name}.pooled"] = emb.pooled[i].float()
    if bundle.mask is not None:
        tensors["mask"] = (bundle.mask[i] > 0.5).to(torch.uint8)
    if bundle.depth is not None:
        tensors["depth"] = bundle.depth[i].float()
    if bundle.landmarks is not None:
        tensors["landmarks"] = bundle.landmarks[i].float()
    texts = {name: getattr(bundle, name)[i] for name in TEXT_PRIORS if getattr(bundle, name) is not None}
    meta = {"texts": texts, "sources": bundle.sources}
    if bundle.mask_labels is not None:
        meta["mask_labels"] = list(bundle.mask_labels)
    return tensors, meta


def bundle_from_item(tensors: dict[str, torch.Tensor], meta: dict) -> PriorBundle:
    """A one-face bundle from a prior file's tensors and metadata (inverse of :func:`item_tensors`)."""
    sources = meta.get("sources", {})
    labels = meta.get("mask_labels")
    out = PriorBundle(batch_size=1, mask_labels=tuple(labels) if labels else None)
    for name, text in meta.get("texts", {}).items():
        out = out.with_prior(name, [text], sources.get(name, {}))
    for name in _EMBEDDINGS:
        if f"{name}.tokens" in tensors:
            emb = TextEmbedding(*(tensors[f"{name}.{part}"].unsqueeze(0) for part in _EMB_PARTS))
            out = out.with_prior(name, emb, sources.get(name, {}))
    for name in ("mask", "depth", "landmarks"):
        if name in tensors:
            out = out.with_prior(name, tensors[name].float().unsqueeze(0), sources.get(name, {}))
    return out


def write_prior_file(
    path: str | os.PathLike, bundle: PriorBundle, i: int, extra: dict | None = None, durable: bool = True
) -> Path:
    """Write face ``i`` of a bundle as one prior file, atomically; ``extra`` goes in the metadata.

    ``durable=False`` skips the fsync (still written to a temporary file and renamed): for cache
    entries, where a file lost in a power cut is just recomputed, and the fsync cost 25-50 ms a file.
    """
    tensors, meta = item_tensors(bundle, i)
    if extra:
        meta["extra"] = extra
    config = {"priors": sorted(bundle.present())}
    extra_metadata = {PRIORS_META_KEY: json.dumps(meta, sort_keys=True)}
    if durable:
        return save_safetensors(tensors, path, PRIOR_FILE_ARCHITECTURE, config, extra_metadata)
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {ARCH_KEY: PRIOR_FILE_ARCHITECTURE, CONFIG_KEY: json.dumps(config), FORMAT_KEY: FORMAT_VERSION}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={**metadata, **extra_metadata}
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_prior_file(path: str | os.PathLike) -> tuple[PriorBundle, dict]:
    """A one-face bundle and the ``extra`` metadata from a prior file."""
    ckpt = read_checkpoint(path)
    if ckpt.architecture != PRIOR_FILE_ARCHITECTURE:
        raise ValueError(f"{path} is not a PriorFace prior file (architecture {ckpt.architecture!r})")
    meta = json.loads(ckpt.metadata.get(PRIORS_META_KEY, "{}"))
    return bundle_from_item(ckpt.content, meta), meta.get("extra", {})


def read_prior_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict] | None:
    """(tensor name -> {dtype, shape}, priors metadata) of a complete prior file, else None.

    Reads only the safetensors header and checks that the file is as long as the header says, so a
    truncated or foreign file counts as absent.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    metadata = header.pop("__metadata__", {}) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if size != 8 + n + end or metadata.get(ARCH_KEY) != PRIOR_FILE_ARCHITECTURE:
        return None
    try:
        meta = json.loads(metadata.get(PRIORS_META_KEY, "{}"))
    except ValueError:
        return None
    return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()}, meta


def present_in_file(keys: dict[str, dict], meta: dict) -> set[str]:
    """Names of the priors a prior file holds (from :func:`read_prior_header`)."""
    names = {k.split(".")[0] for k in keys} & set(TENSOR_PRIORS)
    return names | set(meta.get("texts", {}))


def collate_prior_items(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack prior-file dicts of several faces, padding token sequences (and masks) with zeros."""
    if not items:
        raise ValueError("no prior items to collate")
    keys = set(items[0])
    for item in items[1:]:
        if set(item) != keys:
            raise ValueError(f"prior items hold different priors: {sorted(keys)} and {sorted(item)}")
    out = {}
    for key in sorted(keys):
        values = [item[key] for item in items]
        if key.endswith((".tokens", ".attention_mask")):
            length = max(v.shape[0] for v in values)
            out[key] = torch.stack([_pad_t(v.unsqueeze(0), length)[0] for v in values])
        else:
            out[key] = torch.stack(values)
    return out
