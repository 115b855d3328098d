"""Comparison node: one degraded face through several methods, side by side, scored against a reference."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import torch

from ..inference.images import image_to_bchw

MAX_METHODS = 6


class CompareMethodsNode:
    """Assembles the outputs of up to six methods into one labelled grid with PSNR/SSIM/identity."""

    NODE_ID = "PriorFaceCompareMethods"
    DISPLAY_NAME = "PriorFace Compare Methods"
    CATEGORY = "PriorFace/Metrics"
    DESCRIPTION = (
        "Puts the degraded input, each connected method's result and the reference (if given) side by side, "
        "one row per face, with PSNR, SSIM and identity distance under each result when a reference is given. "
        "Outputs of other sizes are resized to the reference size (the caption says so). Leave unused method "
        "inputs unconnected; mute the branches of methods whose model files you do not have."
    )
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("grid", "table", "json")
    OUTPUT_TOOLTIPS = (
        "The labelled comparison grid.",
        "One line per face and method with its scores.",
        "The same scores as JSON.",
    )
    FUNCTION = "compare"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        optional = {
            "reference": ("IMAGE", {"tooltip": "Ground-truth faces: enables PSNR/SSIM/identity scores."}),
        }
        for i in range(1, MAX_METHODS + 1):
            optional[f"method_{i}"] = ("IMAGE", {"tooltip": f"Result of method {i} on the degraded faces."})
        return {
            "required": {
                "degraded": ("IMAGE", {"tooltip": "The degraded faces every method received."}),
                "labels": (
                    "STRING",
                    {
                        "default": "LLV-FSR, VSPBFR, XPSR, AuthFace, method 5, method 6",
                        "tooltip": "Comma-separated names of method_1 ... method_6, in order.",
                    },
                ),
                "identity": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Also compute the dlib identity distance (needs the faces extra).",
                    },
                ),
            },
            "optional": optional,
        }

    def compare(self, degraded, labels, identity, reference=None, **methods):
        from ..inference.metrics.compare import compare_methods, scores_table

        names = [n.strip() for n in labels.split(",")]
        outputs = []
        for i in range(1, MAX_METHODS + 1):
            image = methods.get(f"method_{i}")
            if image is not None:
                name = names[i - 1] if i - 1 < len(names) and names[i - 1] else f"method {i}"
                outputs.append((name, image_to_bchw(image, name)))
        ref = image_to_bchw(reference, "reference") if reference is not None else None
        grid, scores = compare_methods(image_to_bchw(degraded, "degraded"), outputs, ref, identity)
        table = scores_table(scores)
        grid_image = torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None]
        payload = json.dumps([asdict(s) for s in scores])
        return {"ui": {"text": [table]}, "result": (grid_image, table, payload)}


NODES = [CompareMethodsNode]
