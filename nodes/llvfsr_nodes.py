"""LLV-FSR nodes: load weights (embedded or from models/priorface/llvfsr), upscale aligned faces with
any subset of priors, and restore every face of whole photos through the face pipeline."""

from __future__ import annotations

from ..inference.color_correction import COLOR_CORRECTIONS
from ..inference.images import bchw_to_image, image_to_bchw
from ..inference.llvfsr_restore import (
    EMBEDDED,
    embedded_weights,
    load_llvfsr_model,
    restore_photo,
    upscale_faces,
)
from . import comfy_bridge
from .face_nodes import EMBEDDED_DETECTOR, detector_choices, resolve_detector
from .node_inputs import strength_input, upscale_input

MODEL_TYPE = "PRIORFACE_LLVFSR"
_EMBEDDED_SUFFIX = " (embedded)"


def weight_choices() -> list[str]:
    """Embedded weights first, then every file in the priorface_llvfsr model folder."""
    return [n + _EMBEDDED_SUFFIX for n in EMBEDDED] + comfy_bridge.LOCATOR.list("priorface_llvfsr")


class LLVFSRLoaderNode:
    """Loads LLV-FSR weights: the embedded defaults or your own trained files."""

    NODE_ID = "PriorFaceLLVFSRLoader"
    DISPLAY_NAME = "PriorFace LLV-FSR Loader"
    CATEGORY = "PriorFace/LLV-FSR"
    DESCRIPTION = (
        "Loads an LLV-FSR network. The embedded weights work out of the box: llvfsr-x8 (16 -> 128 px faces, "
        "bicubic-degraded input) and llvfsr-blind (blurred/noisy/JPEG faces). Trained files go in "
        "models/priorface/llvfsr."
    )
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("llvfsr",)
    OUTPUT_TOOLTIPS = ("The loaded network, with the priors it was trained with.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = weight_choices()
        return {
            "required": {
                "weights": (
                    choices,
                    {"default": choices[0], "tooltip": "Embedded weights or a file you trained."},
                ),
            }
        }

    def load(self, weights: str):
        if weights.endswith(_EMBEDDED_SUFFIX):
            path = embedded_weights(weights[: -len(_EMBEDDED_SUFFIX)])
        else:
            path = comfy_bridge.LOCATOR.resolve("priorface_llvfsr", weights)
        return (load_llvfsr_model(path, comfy_bridge.torch_device()),)


class LLVFSRUpscaleNode:
    """Super-resolves aligned face crops, using whichever priors are connected."""

    NODE_ID = "PriorFaceLLVFSRUpscale"
    DISPLAY_NAME = "PriorFace LLV-FSR Upscale Faces"
    CATEGORY = "PriorFace/LLV-FSR"
    DESCRIPTION = (
        "Runs LLV-FSR on aligned faces (framed like the model's training data: the UTKFace template for the "
        "embedded weights). Without priors it computes the embedded ones it was trained with; priors from "
        "another extractor than the model knows are refused with a message."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("faces",)
    OUTPUT_TOOLTIPS = ("Restored faces at the model's output size.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llvfsr": (MODEL_TYPE, {"tooltip": "From LLV-FSR Loader."}),
                "faces": (
                    "IMAGE",
                    {"tooltip": "Aligned low-resolution faces (any size; resized to the model input)."},
                ),
            },
            "optional": {
                "priors": (
                    "PRIORFACE_PRIORS",
                    {"tooltip": "Any subset of priors for these faces (optional)."},
                ),
            },
        }

    def upscale(self, llvfsr, faces, priors=None):
        return (bchw_to_image(upscale_faces(llvfsr, image_to_bchw(faces), priors)),)


class LLVFSRRestorePhotoNode:
    """Detects every face in photos, restores it with LLV-FSR and pastes it back."""

    NODE_ID = "PriorFaceLLVFSRRestorePhoto"
    DISPLAY_NAME = "PriorFace LLV-FSR Restore Photo"
    CATEGORY = "PriorFace/LLV-FSR"
    DESCRIPTION = (
        "Whole-photo restoration: detect -> align -> LLV-FSR -> paste back. Faces already larger in the output "
        "than the model's 128-px faces are left untouched, so no face comes out blurrier than it went in."
    )
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("The restored photos.", "One line per face: restored, or left as is and why.")
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llvfsr": (MODEL_TYPE, {"tooltip": "From LLV-FSR Loader."}),
                "image": ("IMAGE", {"tooltip": "Photos with faces."}),
                "detector": (detector_choices(), {"default": EMBEDDED_DETECTOR, "tooltip": "Face detector."}),
                "upscale": upscale_input(),
                "strength": strength_input(),
                "color_correction": (
                    list(COLOR_CORRECTIONS),
                    {"default": "wavelet", "tooltip": "Keep the original colours of each face."},
                ),
            }
        }

    def restore(self, llvfsr, image, detector, upscale, strength, color_correction):
        backend, path = resolve_detector(detector)
        out, _data, report = restore_photo(
            llvfsr,
            image_to_bchw(image),
            upscale=upscale,
            strength=strength,
            backend=backend,
            model_path=path,
            color_correction=color_correction,
        )
        return (bchw_to_image(out), "\n".join(report) or "no face found")


NODES = [LLVFSRLoaderNode, LLVFSRUpscaleNode, LLVFSRRestorePhotoNode]
