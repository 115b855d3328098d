"""Transformers prior nodes: load BLIP-2/LLaVA/Depth-Anything/CLIP folders, extract caption, description, depth, embeddings."""

from __future__ import annotations

import torch

from ..inference.device import PRECISIONS
from ..inference.images import bchw_to_image, image_to_bchw
from ..inference.model_files import WEIGHT_EXTENSIONS
from ..inference.priors.bundle import TEXT_PRIORS, PriorBundle
from ..inference.priors.hf_caption import GenerationOptions, add_captions
from ..inference.priors.hf_clip_text import add_text_embedding
from ..inference.priors.hf_depth import add_depth
from ..inference.priors.hf_describe import PRESETS, add_descriptions
from ..inference.priors.hf_loading import load_hf_model
from . import comfy_bridge

HF_MODEL_TYPE = "PRIORFACE_HF_MODEL"
PRIORS_TYPE = "PRIORFACE_PRIORS"
_CATEGORY = "PriorFace/Priors"
_MODEL_TIP = "A model from the matching PriorFace loader node."
_PRIORS_TIP = "Priors of these faces to add to (optional); a new bundle is made without it."
_BATCH_TIP = "Faces per forward pass; lower it when the GPU runs out of memory."


def _batch_input(default: int) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": 64, "step": 1, "tooltip": _BATCH_TIP})


def _generation_inputs(max_tokens: int) -> dict:
    return {
        "max_new_tokens": (
            "INT",
            {
                "default": max_tokens,
                "min": 1,
                "max": 1024,
                "step": 1,
                "tooltip": "Longest answer, in tokens.",
            },
        ),
        "num_beams": (
            "INT",
            {
                "default": 1,
                "min": 1,
                "max": 16,
                "step": 1,
                "tooltip": "1 = greedy decoding; more beams search longer for a likelier text (slower).",
            },
        ),
    }


def _start(images: torch.Tensor, priors: PriorBundle | None) -> tuple[torch.Tensor, PriorBundle]:
    faces = image_to_bchw(images, "images")
    if priors is None:
        return faces, PriorBundle(batch_size=faces.shape[0])
    if priors.batch_size != faces.shape[0]:
        raise ValueError(
            f"priors hold {priors.batch_size} face(s) but {faces.shape[0]} image(s) were given; "
            "use the priors made from these crops"
        )
    return faces, priors


def _lines(texts: list[str]) -> str:
    # One line per face, so the STRING output lines up with the batch.
    return "\n".join(" ".join(t.split()) for t in texts)


class _LoaderBase:
    """Loads a transformers model folder of one model kind; subclasses name the kind and families."""

    KIND = ""
    FAMILIES: tuple[str, ...] = ()
    RETURN_TYPES = (HF_MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    CATEGORY = _CATEGORY
    FUNCTION = "load"

    @classmethod
    def choices(cls) -> list[str]:
        """Model folders of this kind (single weight files cannot be used: they carry no tokenizer)."""
        names = [n for n in comfy_bridge.LOCATOR.list(cls.KIND) if not n.lower().endswith(WEIGHT_EXTENSIONS)]
        return names or [f"(no model folder in models/{cls.KIND})"]

    @classmethod
    def INPUT_TYPES(cls):
        names = cls.choices()
        return {
            "required": {
                "model_name": (
                    names,
                    {"default": names[0], "tooltip": f"Transformers model folder in models/{cls.KIND}."},
                ),
                "precision": (
                    list(PRECISIONS),
                    {
                        "default": "auto",
                        "tooltip": "auto: bf16/fp16 on a GPU, fp32 on CPU (half precision is ignored on CPU).",
                    },
                ),
                "keep_loaded": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Keep the model in memory for the next run (up to 3 models are kept).",
                    },
                ),
            }
        }

    def load(self, model_name: str, precision: str, keep_loaded: bool = True):
        folder = comfy_bridge.LOCATOR.resolve(self.KIND, model_name)
        device = comfy_bridge.torch_device()
        return (load_hf_model(folder, self.FAMILIES, device, precision, keep_loaded),)


class LoadCaptionModelNode(_LoaderBase):
    """Loads a BLIP-2, LLaVA 1.5 or LLaVA-NeXT folder from models/LLM."""

    NODE_ID = "PriorFaceLoadCaptionModel"
    DISPLAY_NAME = "PriorFace Load Caption/Description Model"
    DESCRIPTION = (
        "Loads a BLIP-2 (captions) or LLaVA 1.5 / LLaVA-NeXT (descriptions) transformers folder from "
        "models/LLM: config.json, weights, tokenizer and processor files, as save_pretrained writes them."
    )
    OUTPUT_TOOLTIPS = ("The model and its processor, for PriorFace Caption (BLIP-2) or Describe (LLaVA).",)
    KIND = "LLM"
    FAMILIES = ("blip2", "llava", "llava_next")


class LoadDepthModelNode(_LoaderBase):
    """Loads a Depth-Anything (v1 or v2) folder from models/depthanything."""

    NODE_ID = "PriorFaceLoadDepthModel"
    DISPLAY_NAME = "PriorFace Load Depth-Anything"
    DESCRIPTION = (
        "Loads a Depth-Anything transformers folder (config.json, weights, preprocessor_config.json)."
    )
    OUTPUT_TOOLTIPS = ("The depth model and its image processor, for PriorFace Depth (Depth-Anything).",)
    KIND = "depthanything"
    FAMILIES = ("depth_anything",)


class LoadCLIPTextNode(_LoaderBase):
    """Loads a CLIP text encoder folder (or a diffusers pipeline's text_encoder) from models/text_encoders."""

    NODE_ID = "PriorFaceLoadCLIPText"
    DISPLAY_NAME = "PriorFace Load CLIP Text Encoder"
    DESCRIPTION = (
        "Loads a CLIP text encoder from models/text_encoders: a transformers CLIP or CLIP-text folder with "
        "its tokenizer, or a diffusers pipeline folder (text_encoder/ + tokenizer/)."
    )
    OUTPUT_TOOLTIPS = ("The text encoder and its tokenizer, for PriorFace CLIP Text Embedding.",)
    KIND = "text_encoders"
    FAMILIES = ("clip_text",)


class CaptionNode:
    """BLIP-2 caption of each face, stored as the 'caption' prior."""

    NODE_ID = "PriorFaceCaptionBLIP2"
    DISPLAY_NAME = "PriorFace Caption (BLIP-2)"
    CATEGORY = _CATEGORY
    DESCRIPTION = "Writes one BLIP-2 caption per face crop into the 'caption' prior (greedy or beam search)."
    RETURN_TYPES = (PRIORS_TYPE, "STRING")
    RETURN_NAMES = ("priors", "captions")
    OUTPUT_TOOLTIPS = ("Priors with 'caption' set and its provenance.", "The captions, one line per face.")
    FUNCTION = "caption"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (HF_MODEL_TYPE, {"tooltip": _MODEL_TIP}),
                "images": ("IMAGE", {"tooltip": "Face crops to caption."}),
                **_generation_inputs(30),
                "prompt": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional start of the caption, e.g. 'a photo of'; left out of the result.",
                    },
                ),
                "batch_size": _batch_input(4),
            },
            "optional": {"priors": (PRIORS_TYPE, {"tooltip": _PRIORS_TIP})},
        }

    def caption(self, model, images, max_new_tokens, num_beams, prompt, batch_size, priors=None):
        faces, bundle = _start(images, priors)
        options = GenerationOptions(max_new_tokens, num_beams)
        bundle = add_captions(bundle, model, faces, options, prompt, batch_size)
        return (bundle, _lines(bundle.caption))


class DescribeNode:
    """LLaVA answer per face to a method's instruction (XPSR, LLV-FSR, AuthFace) or your own."""

    NODE_ID = "PriorFaceDescribeLLaVA"
    DISPLAY_NAME = "PriorFace Describe (LLaVA)"
    CATEGORY = _CATEGORY
    DESCRIPTION = (
        "Asks LLaVA about each face crop. Presets: XPSR high-level (content) and low-level (quality) prompts, "
        "LLV-FSR facial description, AuthFace photography tags, or a custom instruction."
    )
    RETURN_TYPES = (PRIORS_TYPE, "STRING")
    RETURN_NAMES = ("priors", "texts")
    OUTPUT_TOOLTIPS = (
        "Priors with the target text prior set and its provenance.",
        "The answers, one line per face.",
    )
    FUNCTION = "describe"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (HF_MODEL_TYPE, {"tooltip": _MODEL_TIP}),
                "images": ("IMAGE", {"tooltip": "Face crops to describe."}),
                "preset": (
                    list(PRESETS),
                    {
                        "default": "llvfsr",
                        "tooltip": "Which instruction to give; 'custom' uses the text below.",
                    },
                ),
                "custom_instruction": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Instruction used when preset is 'custom'.",
                    },
                ),
                "target": (
                    ["auto", *TEXT_PRIORS],
                    {
                        "default": "auto",
                        "tooltip": "Prior to fill. auto: xpsr_high->prompt_high, xpsr_low->prompt_low, "
                        "llvfsr/custom->description, authface_tags->caption.",
                    },
                ),
                **_generation_inputs(120),
                "batch_size": _batch_input(2),
            },
            "optional": {"priors": (PRIORS_TYPE, {"tooltip": _PRIORS_TIP})},
        }

    def describe(
        self,
        model,
        images,
        preset,
        custom_instruction,
        target,
        max_new_tokens,
        num_beams,
        batch_size,
        priors=None,
    ):
        faces, bundle = _start(images, priors)
        options = GenerationOptions(max_new_tokens, num_beams)
        bundle, texts = add_descriptions(
            bundle, model, faces, preset, custom_instruction, target, options, batch_size
        )
        return (bundle, _lines(texts))


class DepthNode:
    """Depth-Anything depth of each face, stored as the 'depth' prior."""

    NODE_ID = "PriorFaceDepthAnything"
    DISPLAY_NAME = "PriorFace Depth (Depth-Anything)"
    CATEGORY = _CATEGORY
    DESCRIPTION = "Depth map per face crop, at the crop's size, scaled per face to 0..1 with 1 = nearest."
    RETURN_TYPES = (PRIORS_TYPE, "IMAGE")
    RETURN_NAMES = ("priors", "depth_preview")
    OUTPUT_TOOLTIPS = (
        "Priors with 'depth' set and its provenance.",
        "The depth maps as grey images (white = near).",
    )
    FUNCTION = "estimate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (HF_MODEL_TYPE, {"tooltip": _MODEL_TIP}),
                "images": ("IMAGE", {"tooltip": "Face crops."}),
                "batch_size": _batch_input(4),
            },
            "optional": {"priors": (PRIORS_TYPE, {"tooltip": _PRIORS_TIP})},
        }

    def estimate(self, model, images, batch_size, priors=None):
        faces, bundle = _start(images, priors)
        bundle = add_depth(bundle, model, faces, batch_size)
        return (bundle, bchw_to_image(bundle.depth))


class CLIPTextEmbeddingNode:
    """CLIP embedding of the caption or description prior (long texts in 75-token chunks)."""

    NODE_ID = "PriorFaceCLIPTextEmbedding"
    DISPLAY_NAME = "PriorFace CLIP Text Embedding"
    CATEGORY = _CATEGORY
    DESCRIPTION = (
        "Encodes the priors' captions or descriptions with a CLIP text encoder into caption_embedding or "
        "description_embedding. Texts over 77 tokens are encoded in 75-token chunks, concatenated."
    )
    RETURN_TYPES = (PRIORS_TYPE,)
    RETURN_NAMES = ("priors",)
    OUTPUT_TOOLTIPS = ("Priors with the embedding set and its provenance.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (HF_MODEL_TYPE, {"tooltip": "A model from PriorFace Load CLIP Text Encoder."}),
                "priors": (PRIORS_TYPE, {"tooltip": "Priors holding the texts to encode."}),
                "source": (
                    ["caption", "description"],
                    {"default": "caption", "tooltip": "Which texts to encode (into <source>_embedding)."},
                ),
                "batch_size": _batch_input(8),
            }
        }

    def encode(self, model, priors, source, batch_size):
        return (add_text_embedding(priors, model, source, batch_size),)


NODES = [
    LoadCaptionModelNode,
    LoadDepthModelNode,
    LoadCLIPTextNode,
    CaptionNode,
    DescribeNode,
    DepthNode,
    CLIPTextEmbeddingNode,
]
