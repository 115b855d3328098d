"""Whole-photo face pipeline: detect -> align crops -> (restore) -> paste back, plus a preview.

The nodes and the ``priorface`` command share these functions, so a graph and a headless run
behave the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from .face_align import align_faces, apply_affine, paste_faces
from .face_detection import detect_faces
from .face_types import FaceData
from .images import resize_bchw

# Drawing colours (RGB) for the preview: box, eyes, nose, mouth corners.
_BOX, _EYE, _NOSE, _MOUTH = (0, 220, 0), (40, 120, 255), (255, 220, 0), (255, 40, 40)


def crop_faces(
    images: torch.Tensor,
    backend: str = "dlib",
    model_path: str | os.PathLike | None = None,
    template: str = "ffhq",
    size: int = 512,
    **detect_options,
) -> tuple[torch.Tensor, FaceData]:
    """Detect faces in a BCHW batch and return (aligned crops [N,3,size,size], FaceData)."""
    faces = detect_faces(images, backend=backend, model_path=model_path, **detect_options)
    return align_faces(images, faces, template=template, size=size)


def crop_landmarks(data: FaceData) -> torch.Tensor:
    """Each detected face's landmarks mapped into its aligned crop, [N,5,2]."""
    out = [apply_affine(af.face.landmarks, af.affine) for af in data.faces]
    return torch.tensor(np.stack(out), dtype=torch.float32) if out else torch.zeros(0, 5, 2)


def _check_photos_match(images: torch.Tensor, data: FaceData) -> None:
    got = [tuple(images.shape[-2:])] * images.shape[0]
    if got != [tuple(s) for s in data.image_sizes]:
        want = ", ".join(f"{w}x{h}" for h, w in data.image_sizes)
        raise ValueError(
            f"the photos ({images.shape[0]} of {images.shape[-1]}x{images.shape[-2]}) are not the ones the faces "
            f"were detected in ({len(data.image_sizes)} photo(s): {want}); connect the same IMAGE to both nodes"
        )


def paste_back(
    images: torch.Tensor,
    restored: torch.Tensor,
    data: FaceData,
    upscale: float = 1.0,
    **paste_options,
) -> torch.Tensor:
    """Paste restored crops into the photos; with no faces the photos come back (upscaled) unchanged."""
    _check_photos_match(images, data)
    if not data.faces:
        h, w = images.shape[-2:]
        return resize_bchw(images, max(1, round(h * upscale)), max(1, round(w * upscale)))
    if restored.shape[0] != len(data.faces):
        raise ValueError(
            f"got {restored.shape[0]} restored crop(s) for {len(data.faces)} detected face(s); "
            "the restored batch must hold one crop per face, in the order Detect & Crop Faces gave them"
        )
    return paste_faces(images, restored, data, upscale=upscale, **paste_options)


def restore_photos(
    images: torch.Tensor,
    restore: Callable[[torch.Tensor], torch.Tensor],
    backend: str = "dlib",
    model_path: str | os.PathLike | None = None,
    template: str = "ffhq",
    size: int = 512,
    detect_options: dict | None = None,
    **paste_options,
) -> tuple[torch.Tensor, FaceData]:
    """Detect, align, run ``restore`` on the crops (BCHW -> BCHW), and paste back."""
    crops, data = crop_faces(images, backend, model_path, template, size, **(detect_options or {}))
    restored = restore(crops) if data.faces else crops
    return paste_back(images, restored, data, **paste_options), data


def draw_detections(images: torch.Tensor, data: FaceData) -> torch.Tensor:
    """Copy of the BCHW photos with each face's box, 5 landmarks and index drawn on it."""
    import cv2

    _check_photos_match(images, data)
    out = []
    for i in range(images.shape[0]):
        canvas = np.ascontiguousarray(
            (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        )
        thickness = max(1, round(max(canvas.shape[:2]) / 400))
        for n in data.faces_of(i):
            face = data.faces[n].face
            x1, y1, x2, y2 = (int(round(v)) for v in face.box)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), _BOX, thickness)
            radius = max(2, round(face.size / 12))
            for k, (x, y) in enumerate(face.landmarks):
                colour = _EYE if k < 2 else _NOSE if k == 2 else _MOUTH
                cv2.circle(canvas, (int(round(x)), int(round(y))), radius, colour, -1)
            cv2.putText(
                canvas,
                str(n),
                (x1, max(12, y1 - 4)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4 * thickness + 0.2,
                _BOX,
                thickness,
            )
        out.append(torch.from_numpy(canvas).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)
