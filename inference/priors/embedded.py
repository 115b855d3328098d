"""Priors that need nothing downloaded: landmark mask, template caption/description, MiniLM embeddings.

:func:`extract_embedded_priors` is the one entry point used by the nodes and the batch CLI. Faces
are aligned crops (BCHW in [0,1]). Landmarks are detected with the embedded dlib detector unless
given; detected masks and text embeddings go through a :class:`PriorCache` when one is passed
(masks from given landmarks are cheap and not cached). Caption and description texts given by
the caller replace the templates (source ``user-text``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .bundle import PriorBundle
from .cache import PriorCache
from .captions import (
    CAPTION_EXTRACTOR_ID,
    DESCRIPTION_EXTRACTOR_ID,
    DESCRIPTION_SETTINGS,
    template_caption,
    template_description,
)
from .landmark_mask import MASK_EXTRACTOR_ID, MASK_LABELS, MASK_SETTINGS, detect_crop_landmarks, landmark_mask
from .text_encoder import encode_texts, encoder_identity, load_text_encoder

EMBEDDED_PRIORS = (
    "mask",
    "landmarks",
    "caption",
    "description",
    "caption_embedding",
    "description_embedding",
)
USER_TEXT_ID = "user-text"
DETECTED_LANDMARKS_ID = "dlib-5pt-v1"
_TEXT_OF = {"caption_embedding": "caption", "description_embedding": "description"}


def _check_images(images: torch.Tensor) -> None:
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[1] != 3
        or images.shape[0] == 0
    ):
        raise ValueError(
            f"faces must be a non-empty RGB [B,3,H,W] tensor, got {getattr(images, 'shape', None)}"
        )


def _mask_bundle(landmarks: torch.Tensor, height: int, width: int, landmark_source: dict) -> PriorBundle:
    bundle = PriorBundle(batch_size=landmarks.shape[0], mask_labels=MASK_LABELS)
    mask_source = {"extractor": MASK_EXTRACTOR_ID, **MASK_SETTINGS, "landmarks": landmark_source["extractor"]}
    bundle = bundle.with_prior("mask", landmark_mask(landmarks, height, width), mask_source)
    return bundle.with_prior("landmarks", landmarks.float(), landmark_source)


def landmark_priors(
    images: torch.Tensor,
    landmarks: torch.Tensor | None = None,
    template: str = "ffhq",
    cache: PriorCache | None = None,
) -> PriorBundle:
    """``mask`` (one-hot, MASK_LABELS) and ``landmarks`` of aligned crops; landmarks detected if not given."""
    _check_images(images)
    h, w = images.shape[-2:]
    if landmarks is not None:
        landmarks = torch.as_tensor(landmarks, dtype=torch.float32)
        if landmarks.shape != (images.shape[0], 5, 2):
            raise ValueError(
                f"landmarks must be [{images.shape[0]},5,2] for this batch, got {tuple(landmarks.shape)}"
            )
        return _mask_bundle(landmarks, h, w, {"extractor": "given"})
    source = {"extractor": DETECTED_LANDMARKS_ID, "detector": "dlib", "fallback": f"template:{template}"}

    def compute(batch: torch.Tensor) -> PriorBundle:
        found, _ = detect_crop_landmarks(batch, template)
        return _mask_bundle(found, h, w, source)

    settings = {**MASK_SETTINGS, **source}
    return (cache or PriorCache(enabled=False)).get_or_compute(images, MASK_EXTRACTOR_ID, settings, compute)


def _per_face(texts: Sequence[str] | str | None, n: int, what: str) -> list[str] | None:
    if texts is None:
        return None
    texts = [texts] * n if isinstance(texts, str) else list(texts)
    if len(texts) != n or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{what} must be one non-empty text per face ({n}), got {texts!r}")
    return [t.strip() for t in texts]


def text_priors(
    batch_size: int,
    labels: Sequence[dict | None] | None = None,
    landmarks: torch.Tensor | None = None,
    captions: Sequence[str] | str | None = None,
    descriptions: Sequence[str] | str | None = None,
    mouth_observed: bool = True,
) -> PriorBundle:
    """``caption`` and ``description`` per face: the given texts, else templates from labels/landmarks.

    ``mouth_observed``: the landmarks' mouth corners were measured (not dlib's estimate), so the
    description may speak of the mouth's width.
    """
    labels = list(labels) if labels is not None else [None] * batch_size
    if len(labels) != batch_size:
        raise ValueError(f"{len(labels)} label set(s) for {batch_size} face(s)")
    bundle = PriorBundle(batch_size=batch_size)
    given = _per_face(captions, batch_size, "captions")
    if given is not None:
        bundle = bundle.with_prior("caption", given, {"extractor": USER_TEXT_ID})
    else:
        bundle = bundle.with_prior(
            "caption", [template_caption(lb) for lb in labels], {"extractor": CAPTION_EXTRACTOR_ID}
        )
    given = _per_face(descriptions, batch_size, "descriptions")
    if given is not None:
        return bundle.with_prior("description", given, {"extractor": USER_TEXT_ID})
    pose = landmarks is not None
    source = {
        "extractor": DESCRIPTION_EXTRACTOR_ID,
        **DESCRIPTION_SETTINGS,
        "pose": pose,
        "mouth": pose and mouth_observed,
    }
    return bundle.with_prior("description", template_description(landmarks, labels, mouth_observed), source)


def embed_texts(
    bundle: PriorBundle,
    names: Sequence[str] = ("caption_embedding", "description_embedding"),
    text_encoder: str | Path | None = None,
    cache: PriorCache | None = None,
) -> PriorBundle:
    """Add text embeddings of the bundle's caption/description (``text_encoder`` folder; None: MiniLM)."""
    enc_id, settings = encoder_identity(text_encoder)

    def compute(texts: list[str]) -> PriorBundle:
        # Loading costs seconds: only done when some text is not cached (load_text_encoder caches it).
        unique = list(dict.fromkeys(texts))  # template texts repeat across faces: encode each once
        emb = encode_texts(load_text_encoder(text_encoder), unique)
        emb = emb.select([unique.index(t) for t in texts])
        return PriorBundle(len(texts)).with_prior("caption_embedding", emb, {})

    cache = cache or PriorCache(enabled=False)
    for name in names:
        if name not in _TEXT_OF:
            raise ValueError(f"unknown text embedding {name!r}; expected one of {list(_TEXT_OF)}")
        texts = getattr(bundle, _TEXT_OF[name])
        if texts is None:
            raise ValueError(f"cannot compute {name}: the priors hold no {_TEXT_OF[name]} text")
        # Cached under one slot name: a text embeds the same whether it is a caption or a description.
        emb = cache.get_or_compute_texts(texts, enc_id, settings, compute).caption_embedding
        source = {
            "extractor": enc_id,
            **settings,
            "text": bundle.sources.get(_TEXT_OF[name], {}).get("extractor"),
        }
        bundle = bundle.with_prior(name, emb, source)
    return bundle


def extract_embedded_priors(
    images: torch.Tensor,
    priors: Sequence[str] = EMBEDDED_PRIORS,
    landmarks: torch.Tensor | None = None,
    labels: Sequence[dict | None] | None = None,
    captions: Sequence[str] | str | None = None,
    descriptions: Sequence[str] | str | None = None,
    text_encoder: str | Path | None = None,
    cache: PriorCache | None = None,
    template: str = "ffhq",
) -> PriorBundle:
    """The requested embedded priors (see EMBEDDED_PRIORS) of aligned faces, as one bundle."""
    _check_images(images)
    unknown = sorted(set(priors) - set(EMBEDDED_PRIORS))
    if unknown or not priors:
        raise ValueError(
            f"unknown embedded prior(s) {unknown or list(priors)}; expected some of {EMBEDDED_PRIORS}"
        )
    wanted = set(priors)
    b = images.shape[0]
    bundle = PriorBundle(batch_size=b)
    need_geometry = wanted & {"mask", "landmarks"} or ("description" in wanted and descriptions is None)
    mouth_observed = landmarks is not None
    if need_geometry:
        geometry = landmark_priors(images, landmarks, template, cache)
        landmarks = geometry.landmarks
        for name in ("mask", "landmarks"):
            if name in wanted:
                bundle = bundle.with_prior(name, getattr(geometry, name), geometry.sources[name])
        if "mask" in wanted:
            bundle = replace(bundle, mask_labels=geometry.mask_labels)
    embeddings = [n for n in ("caption_embedding", "description_embedding") if n in wanted]
    texts_wanted = {"caption", "description"} & wanted | {_TEXT_OF[n] for n in embeddings}
    if texts_wanted:
        texts = text_priors(b, labels, landmarks, captions, descriptions, mouth_observed)
        for name in sorted(texts_wanted):
            bundle = bundle.with_prior(name, getattr(texts, name), texts.sources[name])
    if embeddings:
        bundle = embed_texts(bundle, embeddings, text_encoder, cache)
    return bundle
