"""Depth-Anything depth maps of face crops (the ``depth`` prior).

Depth-Anything's relative models predict relative inverse depth (disparity): larger = nearer. The
map is resized (bicubic) to the face crop's size and rescaled per face to [0,1] by its own minimum
and maximum, so 1 is the nearest point of that face and 0 the farthest. Metric variants
(``depth_estimation_type: metric``) predict distance, so they are flipped to keep 1 = near. A
perfectly flat prediction has no near or far and becomes all zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bundle import PriorBundle
from .hf_loading import HFModel, check_bchw, in_mini_batches, to_uint8_list


def normalise_per_face(depth: torch.Tensor, near_is_large: bool = True) -> torch.Tensor:
    """[B,1,H,W] -> each face min-max scaled to [0,1] with 1 = near; flat maps become zeros."""
    flat = depth.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).view(-1, 1, 1, 1)
    scaled = (depth - lo.view(-1, 1, 1, 1)) / span.clamp_min(1e-12)
    if not near_is_large:
        scaled = 1.0 - scaled
    return torch.where(span > 0, scaled, torch.zeros_like(scaled)).clamp(0.0, 1.0)


def estimate_depth(hf: HFModel, images: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Depth of each face of a [B,3,H,W] batch in [0,1] as float32 [B,1,H,W] on CPU, 1 = near."""
    hf.require(("depth_anything",), "depth estimation")
    check_bchw(images, "depth estimation")
    height, width = images.shape[-2:]
    arrays = to_uint8_list(images)
    near_is_large = getattr(hf.model.config, "depth_estimation_type", "relative") != "metric"

    def run(part: slice) -> torch.Tensor:
        inputs = hf.processor(images=arrays[part], return_tensors="pt").to(hf.device, dtype=hf.dtype)
        predicted = hf.model(**inputs).predicted_depth.float().unsqueeze(1)
        resized = F.interpolate(predicted, size=(height, width), mode="bicubic", align_corners=False)
        return normalise_per_face(resized, near_is_large).cpu()

    return torch.cat(list(in_mini_batches(len(arrays), batch_size, "PriorFace depth", run)), dim=0)


def add_depth(bundle: PriorBundle, hf: HFModel, images: torch.Tensor, batch_size: int = 4) -> PriorBundle:
    """A copy of ``bundle`` with the ``depth`` prior, provenance recorded."""
    depth = estimate_depth(hf, images, batch_size)
    settings = {"normalisation": "per_face_minmax", "near": 1.0, "resize": "bicubic"}
    return bundle.with_prior("depth", depth, {"extractor": hf.extractor_id, "settings": settings})
