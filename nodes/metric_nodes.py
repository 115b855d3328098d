"""Metric nodes: PSNR/SSIM(/LPIPS) of restored images against references, and identity distance."""

from __future__ import annotations

import json
import math

import torch

from ..inference.images import image_to_bchw
from ..inference.metrics.evaluate import check_same_size, describe_values, pair_metrics
from ..inference.progress import progress_bar
from . import comfy_bridge

_IMAGE_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")


def _pair_batches(
    a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat a batch of one to match the other; other batch differences are an error."""
    if a.shape[0] == b.shape[0]:
        return a, b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], -1, -1, -1)
    if a.shape[0] == 1:
        return a.expand(b.shape[0], -1, -1, -1), b
    raise ValueError(
        f"{a_name} has {a.shape[0]} images and {b_name} has {b.shape[0]}; expected equal batch sizes or a batch of 1"
    )


def _json_number(value: float | None):
    # JSON has no infinity: identical images (PSNR inf) are written as the string "inf".
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


class ImageMetricsNode:
    """PSNR and SSIM (RGB and Y channel), optionally LPIPS, of restored images against references."""

    NODE_ID = "PriorFaceImageMetrics"
    DISPLAY_NAME = "PriorFace Image Metrics"
    CATEGORY = "PriorFace/Metrics"
    DESCRIPTION = (
        "Compares restored images with references of the same size: PSNR and SSIM on RGB and on the "
        "BT.601 Y channel (8-bit scale, as in super-resolution papers), LPIPS when asked. "
        "Outputs a table, JSON and the batch means."
    )
    RETURN_TYPES = ("STRING", "STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("table", "json", "psnr", "ssim")
    OUTPUT_TOOLTIPS = (
        "One line per image with every metric, then the mean.",
        "The same values as JSON: a list of per-image objects and a 'mean' object.",
        "Mean RGB PSNR in dB over the batch (inf when the images are identical).",
        "Mean RGB SSIM over the batch.",
    )
    FUNCTION = "measure"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "restored": ("IMAGE", {"tooltip": "Images to score (e.g. a face restoration result)."}),
                "reference": (
                    "IMAGE",
                    {"tooltip": "Ground truth of the same size: one per restored image, or one for all."},
                ),
                "crop_border": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 64,
                        "step": 1,
                        "tooltip": "Pixels ignored at each side for PSNR/SSIM (super-resolution papers use the scale factor).",
                    },
                ),
                "lpips": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Also compute LPIPS (VGG); needs vgg.pth and vgg16-397923af.pth in models/priorface/metrics.",
                    },
                ),
            }
        }

    def measure(self, restored: torch.Tensor, reference: torch.Tensor, crop_border: int, lpips: bool = False):
        res, ref = image_to_bchw(restored, "restored"), image_to_bchw(reference, "reference")
        check_same_size(res, ref, "PriorFace Image Metrics")
        res, ref = _pair_batches(res, ref, "restored", "reference")
        metrics, model = list(_IMAGE_METRICS), None
        if lpips:
            from ..inference.metrics.lpips import load_lpips

            model = load_lpips(comfy_bridge.LOCATOR).to(comfy_bridge.torch_device())
            metrics.append("lpips")
        rows = []
        with progress_bar(res.shape[0], "PriorFace metrics") as bar:
            for i in range(res.shape[0]):
                rows.append(pair_metrics(res[i : i + 1], ref[i : i + 1], metrics, crop_border, model))
                bar.update(1)
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        lines = [f"{i}: {describe_values(r)}" for i, r in enumerate(rows)]
        lines.append(f"mean: {describe_values(mean)}")
        table = "\n".join(lines)
        payload = {
            "images": [{k: _json_number(v) for k, v in r.items()} for r in rows],
            "mean": {k: _json_number(v) for k, v in mean.items()},
            "crop_border": crop_border,
        }
        result = (table, json.dumps(payload), float(mean["psnr"]), float(mean["ssim"]))
        return {"ui": {"text": [table]}, "result": result}


class IdentityDistanceNode:
    """dlib face-embedding distance between two images of faces (identity preservation)."""

    NODE_ID = "PriorFaceIdentityDistance"
    DISPLAY_NAME = "PriorFace Identity Distance"
    CATEGORY = "PriorFace/Metrics"
    DESCRIPTION = (
        "Euclidean distance between dlib ResNet face descriptors of two images (per image pair); below "
        "about 0.6 usually means the same person. When no face is detected the whole image is used as "
        "the face box, which suits aligned crops."
    )
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("mean_distance", "report")
    OUTPUT_TOOLTIPS = (
        "Mean descriptor distance over the batch (lower = more similar identity).",
        "One line per image pair: distance and whether a face was detected in both.",
    )
    FUNCTION = "measure"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image_a": ("IMAGE", {"tooltip": "Faces, e.g. the restored images."}),
                "image_b": (
                    "IMAGE",
                    {
                        "tooltip": "Faces to compare with, e.g. references; one per image of image_a, or one for all."
                    },
                ),
                "num_jitters": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 100,
                        "step": 1,
                        "tooltip": "dlib re-samples each face this many times and averages (slower, slightly steadier).",
                    },
                ),
            }
        }

    def measure(self, image_a: torch.Tensor, image_b: torch.Tensor, num_jitters: int):
        from ..inference.metrics.identity import SAME_PERSON_THRESHOLD, identity_distance

        a, b = _pair_batches(
            image_to_bchw(image_a, "image_a"), image_to_bchw(image_b, "image_b"), "image_a", "image_b"
        )
        distances, lines = [], []
        with progress_bar(a.shape[0], "PriorFace identity") as bar:
            for i in range(a.shape[0]):
                d, detected = identity_distance(a[i], b[i], num_jitters)
                distances.append(d)
                verdict = "same person" if d < SAME_PERSON_THRESHOLD else "different person"
                note = "" if detected else " (a face was not detected: whole image used)"
                lines.append(f"{i}: {d:.4f} ({verdict} at {SAME_PERSON_THRESHOLD}){note}")
                bar.update(1)
        mean = sum(distances) / len(distances)
        lines.append(f"mean: {mean:.4f}")
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (float(mean), report)}


NODES = [ImageMetricsNode, IdentityDistanceNode]
