"""Face pipeline nodes: detect + align crops, paste restored crops back, preview detections."""

from __future__ import annotations

import torch

from ..inference.color_correction import COLOR_CORRECTIONS
from ..inference.face_align import TEMPLATES
from ..inference.face_detection import SORT_ORDERS
from ..inference.face_pipeline import crop_faces, draw_detections, paste_back
from ..inference.images import bchw_to_image, image_to_bchw, mask_to_bhw
from . import comfy_bridge
from .node_inputs import upscale_input

EMBEDDED_DETECTOR = "dlib (embedded, no download)"
FACES_TYPE = "PRIORFACE_FACES"


def detector_choices() -> list[str]:
    """The embedded detector plus every RetinaFace .pth / YuNet .onnx in models/facedetection."""
    files = [n for n in comfy_bridge.LOCATOR.list("facedetection") if n.lower().endswith((".pth", ".onnx"))]
    return [EMBEDDED_DETECTOR, *files]


def resolve_detector(choice: str) -> tuple[str, object]:
    """(backend name, model path or None) for a detector choice of the node."""
    if choice == EMBEDDED_DETECTOR:
        return "dlib", None
    path = comfy_bridge.LOCATOR.resolve("facedetection", choice)
    return ("yunet" if path.suffix.lower() == ".onnx" else "retinaface"), path


class DetectFacesNode:
    """Finds faces in photos and returns aligned square crops plus the data to paste them back."""

    NODE_ID = "PriorFaceDetectFaces"
    DISPLAY_NAME = "PriorFace Detect & Crop Faces"
    CATEGORY = "PriorFace/Faces"
    DESCRIPTION = (
        "Detects faces with 5 landmarks in every photo of the batch and aligns each to a template "
        "(FFHQ or the tighter UTKFace framing). Crops of all photos come out as one batch, in photo order."
    )
    RETURN_TYPES = ("IMAGE", FACES_TYPE, "INT")
    RETURN_NAMES = ("crops", "faces", "count")
    OUTPUT_TOOLTIPS = (
        "Aligned face crops, crop_size x crop_size, all faces of all photos in one batch.",
        "Where each crop came from; feed it to Paste Faces Back and Preview Faces.",
        "How many faces were found in the whole batch.",
    )
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Photos (any size; a batch of several works)."}),
                "detector": (
                    detector_choices(),
                    {
                        "default": EMBEDDED_DETECTOR,
                        "tooltip": "dlib works with nothing downloaded; RetinaFace .pth and YuNet .onnx files "
                        "are listed from models/facedetection and are faster and find more faces.",
                    },
                ),
                "template": (
                    list(TEMPLATES),
                    {
                        "default": "ffhq",
                        "tooltip": "ffhq: the FFHQ 512 framing most restoration models expect; utkface: tighter.",
                    },
                ),
                "crop_size": (
                    "INT",
                    {
                        "default": 512,
                        "min": 64,
                        "max": 2048,
                        "step": 8,
                        "tooltip": "Side of the square aligned crops in pixels.",
                    },
                ),
                "score_threshold": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Minimum detector confidence; 0 uses the detector's default.",
                    },
                ),
                "max_faces": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 256,
                        "tooltip": "Keep at most this many faces per photo (0 keeps all).",
                    },
                ),
                "min_face_size": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "tooltip": "Ignore faces whose box is smaller than this (pixels).",
                    },
                ),
                "order": (
                    list(SORT_ORDERS),
                    {"default": "largest", "tooltip": "Order of faces within each photo."},
                ),
                "if_no_face": (
                    ["error", "pass through"],
                    {
                        "default": "error",
                        "tooltip": "error: stop with a message; pass through: output one grey crop, and Paste "
                        "Faces Back returns the photos unchanged.",
                    },
                ),
            }
        }

    def detect(
        self,
        image,
        detector,
        template,
        crop_size,
        score_threshold,
        max_faces,
        min_face_size,
        order,
        if_no_face,
    ):
        backend, path = resolve_detector(detector)
        crops, data = crop_faces(
            image_to_bchw(image),
            backend=backend,
            model_path=path,
            template=template,
            size=crop_size,
            score_threshold=score_threshold or None,
            max_faces=max_faces,
            min_face_size=min_face_size,
            sort=order,
            device=comfy_bridge.torch_device(),
        )
        if not data.faces:
            if if_no_face == "error":
                raise ValueError(
                    f"no face found in {image.shape[0]} photo(s) with {detector}; try another detector, a lower "
                    "score_threshold or min_face_size, or set if_no_face to 'pass through'"
                )
            crops = torch.full((1, 3, crop_size, crop_size), 0.5)
        return (bchw_to_image(crops), data, len(data.faces))


class PasteFacesNode:
    """Warps restored crops back into the photos with a feathered mask and optional colour fix."""

    NODE_ID = "PriorFacePasteFaces"
    DISPLAY_NAME = "PriorFace Paste Faces Back"
    CATEGORY = "PriorFace/Faces"
    DESCRIPTION = (
        "Inverse-warps each restored face into its photo (optionally upscaling the whole photo), blending "
        "with a feathered mask; AdaIN or wavelet colour correction against the original avoids colour shifts."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The photos with the restored faces pasted in.",)
    FUNCTION = "paste"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The original photos given to Detect & Crop Faces."}),
                "restored": ("IMAGE", {"tooltip": "Restored crops, one per face, any square size."}),
                "faces": (FACES_TYPE, {"tooltip": "The faces output of Detect & Crop Faces."}),
                "upscale": upscale_input(),
                "feather": (
                    "FLOAT",
                    {
                        "default": 0.05,
                        "min": 0.0,
                        "max": 0.5,
                        "step": 0.01,
                        "tooltip": "Width of the soft edge, as a fraction of the crop side.",
                    },
                ),
                "color_correction": (
                    list(COLOR_CORRECTIONS),
                    {
                        "default": "none",
                        "tooltip": "Match the restored face's colours to the original: adain (mean/std) or "
                        "wavelet (keeps the original's low frequencies).",
                    },
                ),
            },
            "optional": {
                "face_masks": (
                    "MASK",
                    {"tooltip": "Optional per-face region masks in crop space (1 = paste)."},
                ),
            },
        }

    def paste(self, image, restored, faces, upscale, feather, color_correction, face_masks=None):
        photos = image_to_bchw(image)
        crops = image_to_bchw(restored)
        masks = None
        if face_masks is not None and faces.faces:
            masks = mask_to_bhw(face_masks, crops.shape[0], crops.shape[-2], crops.shape[-1])
        out = paste_back(
            photos,
            crops,
            faces,
            upscale=upscale,
            feather=feather,
            face_masks=masks,
            color_correction=color_correction,
        )
        return (bchw_to_image(out),)


class PreviewFacesNode:
    """Draws detection boxes, the five landmarks and face numbers onto the photos."""

    NODE_ID = "PriorFacePreviewFaces"
    DISPLAY_NAME = "PriorFace Preview Faces"
    CATEGORY = "PriorFace/Faces"
    DESCRIPTION = "Draws each detected face's box, 5 landmarks and number, to check detection at a glance."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)
    OUTPUT_TOOLTIPS = ("The photos with boxes (green), eyes (blue), nose (yellow) and mouth corners (red).",)
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The photos given to Detect & Crop Faces."}),
                "faces": (FACES_TYPE, {"tooltip": "The faces output of Detect & Crop Faces."}),
            }
        }

    def preview(self, image, faces):
        return (bchw_to_image(draw_detections(image_to_bchw(image), faces)),)


NODES = [DetectFacesNode, PasteFacesNode, PreviewFacesNode]
