"""Utility nodes: where model files are looked for, and normalising odd IMAGE inputs to RGB."""

from __future__ import annotations

import torch

from ..inference.images import alpha_of, bchw_to_image, image_to_bchw
from ..inference.model_files import MODEL_KINDS, describe_folders
from . import comfy_bridge

_ALL = "all"


class ModelFoldersNode:
    """Shows where PriorFace looks for each kind of model file and what it found there."""

    NODE_ID = "PriorFaceModelFolders"
    DISPLAY_NAME = "PriorFace Model Folders"
    CATEGORY = "PriorFace/Utilities"
    DESCRIPTION = (
        "Lists the folders searched for each kind of model file and the files found, to check an install."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("One section per model kind: searched folders and the files found in them.",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": ([_ALL, *MODEL_KINDS], {"default": _ALL, "tooltip": "Which model folder to list."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, kind):
        # Files may appear between runs: always re-scan.
        return float("nan")

    def report(self, kind: str):
        keys = list(MODEL_KINDS) if kind == _ALL else [kind]
        text = describe_folders(comfy_bridge.LOCATOR, keys)
        return {"ui": {"text": [text]}, "result": (text,)}


class ImageToRGBNode:
    """Turns grayscale, gray+alpha or RGBA images into RGB, optionally over a background colour."""

    NODE_ID = "PriorFaceImageToRGB"
    DISPLAY_NAME = "PriorFace Image to RGB"
    CATEGORY = "PriorFace/Utilities"
    DESCRIPTION = "Normalises any IMAGE to 3-channel RGB; transparent areas are composited over a background."
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "transparency")
    OUTPUT_TOOLTIPS = (
        "RGB image.",
        "1 where the input was transparent (LoadImage's convention), 0 elsewhere.",
    )
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Any IMAGE: RGB, grayscale, gray+alpha or RGBA."}),
                "background": (
                    ["keep colour", "white", "black", "grey"],
                    {
                        "default": "keep colour",
                        "tooltip": "What shows through transparent pixels; 'keep colour' drops alpha unchanged.",
                    },
                ),
            }
        }

    def convert(self, image: torch.Tensor, background: str):
        rgb = image_to_bchw(image)
        alpha = alpha_of(image)
        if alpha is None:
            alpha = torch.ones(rgb.shape[0], rgb.shape[2], rgb.shape[3])
        elif background != "keep colour":
            level = {"white": 1.0, "black": 0.0, "grey": 0.5}[background]
            a = alpha.unsqueeze(1)
            rgb = rgb * a + level * (1.0 - a)
        return (bchw_to_image(rgb), (1.0 - alpha).contiguous())


NODES = [ModelFoldersNode, ImageToRGBNode]
