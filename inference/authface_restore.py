"""AuthFace restoration of aligned faces and of whole photos (through the shared face pipeline).

A face is resized to the working size (``size``; SDXL's native 1024 by default), padded to a
multiple of 8, sampled (inference/authface_sampler.py), decoded (tiled when ``vae_tile`` is set),
cropped back and colour-fixed against the resized degraded face. Face ``i`` of a batch uses the
seed ``seed + i``, so a face gives the same result alone or with others before it in the batch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .authface_sampler import AuthFaceModel, AuthFaceSettings, encode_conditioning, sample_latents
from .color_correction import apply_color_correction
from .face_types import FaceData
from .images import resize_bchw
from .progress import progress_bar
from .xpsr_vae import VAE_FACTOR, decode_latents

DEFAULT_SIZE = 1024  # SDXL's training resolution
TEMPLATE = "ffhq"  # face framing of the stage I / II training crops


def pad_to_multiple(images: torch.Tensor, multiple: int = VAE_FACTOR) -> torch.Tensor:
    """Pad BCHW ``images`` at the bottom and right (replicate) to multiples of ``multiple``."""
    pad_h, pad_w = -images.shape[-2] % multiple, -images.shape[-1] % multiple
    if not (pad_h or pad_w):
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


@torch.no_grad()
def restore_faces(
    model: AuthFaceModel,
    faces: torch.Tensor,
    settings: AuthFaceSettings | None = None,
    size: int | None = DEFAULT_SIZE,
) -> torch.Tensor:
    """Restore BCHW faces in [0, 1] at ``size`` x ``size`` (None: their own size); CPU float32 in [0, 1]."""
    if faces.dim() != 4 or faces.shape[1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"expected RGB faces (B, 3, H, W) with B >= 1, got shape {tuple(faces.shape)}")
    if size is not None and size < VAE_FACTOR:
        raise ValueError(f"size must be >= {VAE_FACTOR} px, got {size}")
    settings = settings or AuthFaceSettings()
    device = model.device
    lq = faces.float() if size is None else resize_bchw(faces.float(), size, size)
    h, w = lq.shape[-2:]
    control = pad_to_multiple(lq).to(device)
    cond = encode_conditioning(model, settings, tuple(control.shape[-2:]))
    outs = []
    with progress_bar(faces.shape[0] * settings.steps_run, "AuthFace") as bar:
        for i in range(faces.shape[0]):
            generator = torch.Generator(device="cpu").manual_seed(settings.seed + i)
            latents = sample_latents(model, control[i : i + 1], cond, settings, generator, bar)
            tile, overlap = settings.vae_tile // VAE_FACTOR, settings.vae_overlap // VAE_FACTOR
            image = decode_latents(model.vae, latents, tile, overlap)[:, :, :h, :w].float()
            outs.append(
                apply_color_correction(image, lq[i : i + 1].to(image.device), settings.color_fix).cpu()
            )
    return torch.cat(outs)


def restore_photo(
    model: AuthFaceModel,
    photos: torch.Tensor,
    settings: AuthFaceSettings | None = None,
    size: int = DEFAULT_SIZE,
    upscale: float = 1.0,
    backend: str = "dlib",
    model_path: str | os.PathLike | None = None,
    **detect_options,
) -> tuple[torch.Tensor, FaceData, list[str]]:
    """Detect, align (FFHQ framing) at ``size``, restore every face, paste back into the upscaled photos.

    Returns (photos, face data, one line per face).
    """
    from .face_pipeline import restore_photos

    settings = settings or AuthFaceSettings()
    out, data = restore_photos(
        photos,
        lambda crops: restore_faces(model, crops, settings, size=None),
        backend=backend,
        model_path=model_path,
        template=TEMPLATE,
        size=size,
        detect_options=detect_options,
        upscale=upscale,
    )
    report = [
        f"face {i} (photo {af.face.image_index}, eye distance {af.face.size:.0f} px): restored at {size} px"
        for i, af in enumerate(data.faces)
    ]
    return out, data, report
