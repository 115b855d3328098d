"""Prior nodes that need nothing downloaded: embedded priors, priors from typed text, inspect, merge."""

from __future__ import annotations

from ..inference.face_align import TEMPLATES
from ..inference.images import bchw_to_image, image_to_bchw
from ..inference.priors.bundle import PriorBundle
from ..inference.priors.bundle_io import merge_bundles
from ..inference.priors.cache import PriorCache
from ..inference.priors.embedded import USER_TEXT_ID, embed_texts, extract_embedded_priors
from ..inference.priors.text_encoder import EMBEDDED_TEXT_ENCODER
from ..inference.priors.visualize import (
    depth_colormap,
    describe_bundle,
    grey_placeholder,
    mask_overlay,
)

PRIORS_TYPE = "PRIORFACE_PRIORS"
_PRIORS_TIP = "Existing priors to add to; priors computed here replace ones of the same name."
_ENCODER_TIP = "Text encoder for the embeddings; the embedded MiniLM (all-MiniLM-L6-v2) needs no download."
_LINES_TIP = (
    " One text for every face, or one line per face when the text has exactly as many non-empty lines as"
    " there are faces."
)


def texts_for_faces(text: str, count: int) -> list[str] | None:
    """Per-face texts from a node's text box: None when empty, one per line when the counts match."""
    text = (text or "").strip()
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if count > 1 and len(lines) == count:
        return lines
    return [text] * count


def _encoder_folder(choice: str):
    if choice != EMBEDDED_TEXT_ENCODER:
        raise ValueError(f"unknown text encoder {choice!r}; expected {EMBEDDED_TEXT_ENCODER!r}")
    return None  # None selects the embedded MiniLM folder


class EmbeddedPriorsNode:
    """Facial-region mask, template texts and MiniLM embeddings of aligned faces, nothing to download."""

    NODE_ID = "PriorFaceEmbeddedPriors"
    DISPLAY_NAME = "PriorFace Embedded Priors"
    CATEGORY = "PriorFace/Priors"
    DESCRIPTION = (
        "Priors that work offline: a skin/eyes/nose/mouth mask drawn from the 5 landmarks (dlib, embedded), "
        "a caption and a description (typed, or templates from the head pose), and their MiniLM embeddings. "
        "Results can be cached on disk per face."
    )
    RETURN_TYPES = (PRIORS_TYPE, "STRING")
    RETURN_NAMES = ("priors", "summary")
    OUTPUT_TOOLTIPS = ("The priors of every face.", "What was computed, with the extractor of each prior.")
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "faces": ("IMAGE", {"tooltip": "Aligned face crops (Detect & Crop Faces output)."}),
                "mask": ("BOOLEAN", {"default": True, "tooltip": "Facial-region mask and the landmarks."}),
                "caption": ("BOOLEAN", {"default": True, "tooltip": "A short caption per face."}),
                "description": ("BOOLEAN", {"default": True, "tooltip": "A longer description per face."}),
                "text_embeddings": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Embed the enabled caption/description with the text encoder.",
                    },
                ),
                "caption_text": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Caption to use; empty falls back to the template 'a photo of a face'."
                        + _LINES_TIP,
                    },
                ),
                "description_text": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Description to use; empty falls back to a template describing the head pose "
                        "measured from the landmarks." + _LINES_TIP,
                    },
                ),
                "text_encoder": (
                    [EMBEDDED_TEXT_ENCODER],
                    {"default": EMBEDDED_TEXT_ENCODER, "tooltip": _ENCODER_TIP},
                ),
                "template": (
                    list(TEMPLATES),
                    {
                        "default": "ffhq",
                        "tooltip": "Template the faces were aligned to; its landmarks stand in where dlib finds "
                        "no face (very degraded crops).",
                    },
                ),
                "use_cache": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Reuse masks and embeddings computed before for the same face.",
                    },
                ),
            },
            "optional": {
                "cache_dir": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Cache folder; empty uses $PRIORFACE_CACHE_DIR or ~/.cache/priorface/priors.",
                    },
                ),
                "priors": (PRIORS_TYPE, {"tooltip": _PRIORS_TIP}),
            },
        }

    def extract(
        self,
        faces,
        mask,
        caption,
        description,
        text_embeddings,
        caption_text,
        description_text,
        text_encoder,
        template,
        use_cache,
        cache_dir="",
        priors=None,
    ):
        images = image_to_bchw(faces, "faces")
        b = images.shape[0]
        wanted = [n for n, on in (("mask", mask), ("landmarks", mask), ("caption", caption)) if on]
        wanted += ["description"] if description else []
        if text_embeddings:
            wanted += [
                f"{t}_embedding" for t, on in (("caption", caption), ("description", description)) if on
            ]
        if not wanted:
            raise ValueError("nothing to compute: enable at least one of mask, caption or description")
        bundle = extract_embedded_priors(
            images,
            wanted,
            captions=texts_for_faces(caption_text, b),
            descriptions=texts_for_faces(description_text, b),
            text_encoder=_encoder_folder(text_encoder),
            cache=PriorCache(cache_dir.strip() or None, enabled=use_cache),
            template=template,
        )
        if priors is not None:
            bundle = merge_bundles(priors, bundle)
        return (bundle, describe_bundle(bundle))


class PriorsFromTextNode:
    """Caption/description typed by the artist, embedded with the text encoder, as priors."""

    NODE_ID = "PriorFacePriorsFromText"
    DISPLAY_NAME = "PriorFace Priors from Text"
    CATEGORY = "PriorFace/Priors"
    DESCRIPTION = (
        "Turns a caption and/or a description you type into priors with their embeddings (embedded MiniLM), "
        "added to existing priors when given. Both texts empty is an error."
    )
    RETURN_TYPES = (PRIORS_TYPE,)
    RETURN_NAMES = ("priors",)
    OUTPUT_TOOLTIPS = ("The texts and their embeddings (plus the input priors).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "caption": (
                    "STRING",
                    {"default": "", "multiline": True, "tooltip": "Short caption." + _LINES_TIP},
                ),
                "description": (
                    "STRING",
                    {"default": "", "multiline": True, "tooltip": "Longer description." + _LINES_TIP},
                ),
                "text_encoder": (
                    [EMBEDDED_TEXT_ENCODER],
                    {"default": EMBEDDED_TEXT_ENCODER, "tooltip": _ENCODER_TIP},
                ),
                "count": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 4096,
                        "tooltip": "Number of faces, used when no priors are connected (else their count).",
                    },
                ),
            },
            "optional": {"priors": (PRIORS_TYPE, {"tooltip": _PRIORS_TIP})},
        }

    def encode(self, caption, description, text_encoder, count, priors=None):
        n = priors.batch_size if priors is not None else count
        bundle = PriorBundle(batch_size=n)
        names = []
        for name, text in (("caption", caption), ("description", description)):
            texts = texts_for_faces(text, n)
            if texts is not None:
                bundle = bundle.with_prior(name, texts, {"extractor": USER_TEXT_ID})
                names.append(f"{name}_embedding")
        if not names:
            raise ValueError("both caption and description are empty: type at least one of them")
        bundle = embed_texts(bundle, names, _encoder_folder(text_encoder))
        return (merge_bundles(priors, bundle) if priors is not None else bundle,)


class InspectPriorsNode:
    """What a priors bundle holds, with pictures of its mask and depth."""

    NODE_ID = "PriorFaceInspectPriors"
    DISPLAY_NAME = "PriorFace Inspect Priors"
    CATEGORY = "PriorFace/Priors"
    DESCRIPTION = (
        "Lists the priors present and the extractor (with settings) of each, and draws the mask over the faces "
        "and the depth as a colour map. Absent priors give a grey picture of the faces' size."
    )
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("summary", "mask_overlay", "depth_map")
    OUTPUT_TOOLTIPS = (
        "Priors present, first texts, shapes and sources.",
        "Mask classes in colour over the faces (grey when there is no mask).",
        "Depth colour map, violet far to yellow near (grey when there is no depth).",
    )
    FUNCTION = "inspect"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"priors": (PRIORS_TYPE, {"tooltip": "Priors to inspect."})},
            "optional": {"faces": ("IMAGE", {"tooltip": "The faces, drawn under the mask colours."})},
        }

    def inspect(self, priors, faces=None):
        images = image_to_bchw(faces, "faces") if faces is not None else None
        if images is not None and images.shape[0] != priors.batch_size:
            raise ValueError(f"{images.shape[0]} face image(s) for priors of {priors.batch_size} face(s)")
        h, w = _size_of(priors, images)
        if priors.mask is not None:
            overlay = mask_overlay(images, priors.mask, priors.mask_labels)  # no faces: colours alone
        else:
            overlay = grey_placeholder(priors.batch_size, h, w)
        depth = (
            depth_colormap(priors.depth)
            if priors.depth is not None
            else grey_placeholder(priors.batch_size, h, w)
        )
        summary = describe_bundle(priors)
        return {"ui": {"text": [summary]}, "result": (summary, bchw_to_image(overlay), bchw_to_image(depth))}


def _size_of(priors: PriorBundle, images) -> tuple[int, int]:
    for t in (images, priors.mask, priors.depth):
        if t is not None:
            return tuple(t.shape[-2:])
    return 512, 512  # nothing tells the face size: the FFHQ crop size


class MergePriorsNode:
    """Two priors bundles of the same faces as one; the second wins where both hold a prior."""

    NODE_ID = "PriorFaceMergePriors"
    DISPLAY_NAME = "PriorFace Merge Priors"
    CATEGORY = "PriorFace/Priors"
    DESCRIPTION = (
        "Combines two priors bundles of the same faces; where both hold a prior, the second one is kept."
    )
    RETURN_TYPES = (PRIORS_TYPE,)
    RETURN_NAMES = ("priors",)
    OUTPUT_TOOLTIPS = ("Every prior of both inputs.",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "first": (PRIORS_TYPE, {"tooltip": "Priors kept where the second has none."}),
                "second": (PRIORS_TYPE, {"tooltip": "Priors that replace the first's of the same name."}),
            }
        }

    def merge(self, first, second):
        return (merge_bundles(first, second),)


NODES = [EmbeddedPriorsNode, PriorsFromTextNode, InspectPriorsNode, MergePriorsNode]
