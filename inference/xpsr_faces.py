"""XPSR on every face of whole photos: detect -> align -> XPSR x4 -> paste back.

Each face is cropped at ``face_size / upscale`` (128 px for a 512-px result at x4, the LR size
XPSR was trained for) and super-resolved to ``face_size``. Prompts hold one text for all faces or
one per face, in detection order (e.g. from PriorFace Describe run on PriorFace Detect & Crop
Faces' crops with the same detector).
"""

from __future__ import annotations

import torch

from .face_types import FaceData
from .xpsr_prompts import XPSRPrompts
from .xpsr_sampler import NoiseModel, SamplerSettings, XPSRPipeline, xpsr_upscale


def restore_faces_xpsr(
    pipe: XPSRPipeline,
    photos: torch.Tensor,
    prompts: XPSRPrompts,
    settings: SamplerSettings,
    face_size: int = 512,
    photo_upscale: float = 1.0,
    strength: float = 1.0,
    backend: str = "dlib",
    model_path=None,
    template: str = "ffhq",
    color_correction: str = "wavelet",
    model: NoiseModel | None = None,
    detect_options: dict | None = None,
) -> tuple[torch.Tensor, FaceData, list[str]]:
    """Restore every face of BCHW photos with XPSR; returns (photos, face data, one report line per face)."""
    from .face_pipeline import crop_faces, paste_back

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    lr_size = round(face_size / settings.upscale)
    if lr_size < 16:
        raise ValueError(f"face_size / upscale = {lr_size} px is too small a face crop; expected >= 16")
    # Same detector defaults as Detect & Crop Faces, so per-face prompts made from its crops line up.
    crops, data = crop_faces(photos, backend, model_path, template, lr_size, **(detect_options or {}))
    if not data.faces:
        return paste_back(photos, crops, data, upscale=photo_upscale), data, []
    if prompts.count not in (1, len(data.faces)):
        raise ValueError(
            f"the prompts describe {prompts.count} face(s) but {len(data.faces)} face(s) were detected; describe "
            "the crops of Detect & Crop Faces run with the same detector and template, or use one prompt for all"
        )
    restored = xpsr_upscale(pipe, crops, prompts, settings, model)
    sized = torch.nn.functional.interpolate(
        crops, size=restored.shape[-2:], mode="bicubic", align_corners=False
    )
    restored = strength * restored + (1.0 - strength) * sized.clamp(0, 1)
    report = [
        f"face {i} (photo {af.face.image_index}, eye distance {af.face.size:.0f} px): restored from a "
        f"{lr_size}-px crop to {restored.shape[-1]} px"
        for i, af in enumerate(data.faces)
    ]
    out = paste_back(photos, restored, data, upscale=photo_upscale, color_correction=color_correction)
    return out, data, report
