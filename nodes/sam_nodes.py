"""SAM nodes: load a segment-anything checkpoint, and turn aligned faces into a semantic mask prior."""

from __future__ import annotations

import torch

from ..inference.face_align import TEMPLATES
from ..inference.images import bchw_to_image, image_to_bchw
from ..inference.priors.sam_loading import load_sam
from ..inference.priors.sam_mask import (
    MASK_LABELS,
    MODES,
    SELECTIONS,
    face_region,
    sam_face_masks,
    with_sam_mask,
)
from ..inference.priors.visualize import mask_overlay
from . import comfy_bridge

SAM_TYPE = "PRIORFACE_SAM"
PRIORS_TYPE = "PRIORFACE_PRIORS"
NO_FILE = "(no file in models/sams)"


def sam_choices() -> list[str]:
    """SAM checkpoints found in the 'sams' model folders (a placeholder when there are none)."""
    return comfy_bridge.LOCATOR.list("sams") or [NO_FILE]


class SAMLoaderNode:
    """Loads an official (or compatible) segment-anything checkpoint; the variant comes from its weights."""

    NODE_ID = "PriorFaceSAMLoader"
    DISPLAY_NAME = "PriorFace SAM Loader"
    CATEGORY = "PriorFace/Priors"
    DESCRIPTION = (
        "Loads a Segment Anything checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
        "sam_vit_h_4b8939.pth) from models/sams. ViT-B/L/H is recognised from the weights, not the file name."
    )
    RETURN_TYPES = (SAM_TYPE,)
    RETURN_NAMES = ("sam",)
    OUTPUT_TOOLTIPS = ("The SAM network, for PriorFace SAM Face Mask.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = sam_choices()
        return {
            "required": {
                "sam_name": (
                    files,
                    {
                        "default": files[0],
                        "tooltip": "Checkpoint in models/sams (official .pth files from the segment-anything "
                        "repository; ViT-B is the fastest).",
                    },
                ),
            }
        }

    def load(self, sam_name: str):
        path = comfy_bridge.LOCATOR.resolve("sams", sam_name)
        return (load_sam(path, device=comfy_bridge.torch_device()),)


class SAMFaceMaskNode:
    """Facial semantic mask prior (skin, brows, eyes, nose, mouth, hair) of aligned faces with SAM."""

    NODE_ID = "PriorFaceSAMFaceMask"
    DISPLAY_NAME = "PriorFace SAM Face Mask"
    CATEGORY = "PriorFace/Priors"
    DESCRIPTION = (
        "Segments aligned face crops into background, skin, brows, eyes, nose, mouth and hair with SAM. "
        "prompted: SAM is prompted per part with points and boxes placed from the 5 landmarks; automatic: "
        "SAM's grid of points, each mask given to the part whose landmark region holds it. Landmarks come "
        "from the priors input when set, else dlib finds them."
    )
    RETURN_TYPES = (PRIORS_TYPE, "MASK", "IMAGE")
    RETURN_NAMES = ("priors", "face_mask", "overlay")
    OUTPUT_TOOLTIPS = (
        "The priors (input priors, if any) with the one-hot semantic mask and its SAM provenance set.",
        "1 on the face: skin and facial parts, hair and background excluded.",
        "The faces with each part tinted (skin, brows, eyes, nose, mouth, hair) to check the mask.",
    )
    FUNCTION = "segment"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Aligned face crops (Detect & Crop Faces, FFHQ framing)."}),
                "sam": (SAM_TYPE, {"tooltip": "A model from PriorFace SAM Loader."}),
                "mode": (
                    list(MODES),
                    {
                        "default": "prompted",
                        "tooltip": "prompted: one SAM prompt per facial part (fast, one embedding per face); "
                        "automatic: SAM's point grid, masks assigned to parts by landmark regions.",
                    },
                ),
                "selection": (
                    list(SELECTIONS),
                    {
                        "default": "plausible",
                        "tooltip": "prompted mode: which of SAM's 3 masks per part to keep: the best-scored one "
                        "whose size and place fit the landmarks (plausible), or simply the best-scored one.",
                    },
                ),
                "points_per_side": (
                    "INT",
                    {
                        "default": 16,
                        "min": 1,
                        "max": 64,
                        "step": 1,
                        "tooltip": "automatic mode: grid points per side (cost grows with its square).",
                    },
                ),
                "pred_iou_thresh": (
                    "FLOAT",
                    {
                        "default": 0.88,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "automatic mode: drop masks whose predicted quality is below this.",
                    },
                ),
                "stability_score_thresh": (
                    "FLOAT",
                    {
                        "default": 0.95,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "automatic mode: drop masks that change shape when the threshold moves.",
                    },
                ),
                "template": (
                    list(TEMPLATES),
                    {
                        "default": "ffhq",
                        "tooltip": "Alignment template of the crops: its landmarks are used where dlib finds "
                        "no face.",
                    },
                ),
            },
            "optional": {
                "priors": (
                    PRIORS_TYPE,
                    {"tooltip": "Priors to add the mask to; their landmarks, when set, place the prompts."},
                ),
            },
        }

    def segment(
        self,
        images,
        sam,
        mode,
        selection,
        points_per_side,
        pred_iou_thresh,
        stability_score_thresh,
        template,
        priors=None,
    ):
        faces = image_to_bchw(images, "images")
        if priors is not None and priors.batch_size != faces.shape[0]:
            raise ValueError(
                f"priors hold {priors.batch_size} face(s) but {faces.shape[0]} image(s) were given; "
                "use the priors made from these crops"
            )
        result = sam_face_masks(
            sam,
            faces,
            landmarks=None if priors is None else priors.landmarks,
            mode=mode,
            selection=selection,
            points_per_side=points_per_side,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            template=template,
        )
        bundle = with_sam_mask(priors, sam, result)
        region = face_region(result.one_hot).to(torch.float32)
        return (bundle, region, bchw_to_image(mask_overlay(faces, result.one_hot, MASK_LABELS)))


NODES = [SAMLoaderNode, SAMFaceMaskNode]
