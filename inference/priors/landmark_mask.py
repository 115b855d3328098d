"""Facial region masks drawn from the 5 landmarks of an aligned face: works with nothing downloaded.

The label map is built from ellipses placed in a face frame measured on the landmarks: ``u`` along
the eye line, ``d`` from the eye midpoint towards the mouth midpoint (so head roll and face length
are followed). Proportions were chosen on the FFHQ 512 template (inter-ocular distance 126 px,
eye-to-mouth distance 131 px) and checked by eye on the dev faces; they are heuristics, not a
parser: hair, brows, ears and the neck are not modelled, and a strongly turned head gets a
frontal-shaped oval. Classes are drawn in order (skin, nose, eyes, mouth), later ones on top.

:func:`eye_mouth_boxes` gives square boxes around both eyes and the mouth with GFPGAN-like
proportions (its facial-component boxes), for AuthFace's eye/mouth loss.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..face_align import template_points

log = logging.getLogger(__name__)

MASK_EXTRACTOR_ID = "landmark-mask-v1"
MASK_LABELS = ("background", "skin", "eyes", "nose", "mouth")

# Ellipses in the face frame. Centres: eye_mid + a*iod*u + b*dist*d; semi-axes along u and d.
# (centre_u_iod, centre_d_em, semi_u_iod, semi_d_em) for the face oval: forehead to chin.
_FACE_OVAL = (0.0, 0.43, 1.08, 1.18)
_EYE_SEMI = (0.21, 0.11)  # eye half-width and half-height, in inter-ocular distances
_NOSE_SPAN = (0.1, 1.25)  # nose from this fraction of eye_mid->tip to this fraction (below the tip)
_NOSE_HALF_WIDTH = 0.2  # in inter-ocular distances (nostrils included)
_MOUTH_SEMI = (0.6, 0.24)  # mouth half-width and half-height, in mouth-corner distances
# GFPGAN-like component boxes: eye half-side from the inter-ocular distance, mouth half-side from
# the mouth-corner distance (GFPGAN enlarges its eye boxes 1.4x; folded in here).
_EYE_BOX_HALF = 0.25
_MOUTH_BOX_HALF = 0.62

MASK_SETTINGS = {
    "labels": list(MASK_LABELS),
    "face_oval": list(_FACE_OVAL),
    "eye": list(_EYE_SEMI),
    "nose": [*_NOSE_SPAN, _NOSE_HALF_WIDTH],
    "mouth": list(_MOUTH_SEMI),
}


def _check_landmarks(landmarks: torch.Tensor) -> torch.Tensor:
    lm = torch.as_tensor(landmarks, dtype=torch.float32)
    if lm.dim() == 2:
        lm = lm.unsqueeze(0)
    if lm.dim() != 3 or lm.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must have shape [B,5,2] (pixels of the crop), got {tuple(lm.shape)}")
    if not torch.isfinite(lm).all():
        raise ValueError("landmarks contain NaN or infinite values")
    return lm


def face_frame(landmarks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eye midpoint, unit vectors u (eye line) and d (towards the mouth), and the two face lengths."""
    lm = _check_landmarks(landmarks)
    eye_mid = (lm[:, 0] + lm[:, 1]) / 2
    mouth_mid = (lm[:, 3] + lm[:, 4]) / 2
    axis = lm[:, 1] - lm[:, 0]
    iod = axis.norm(dim=1).clamp_min(1e-3)
    down = mouth_mid - eye_mid
    em = down.norm(dim=1).clamp_min(1e-3)
    return {
        "eye_mid": eye_mid,
        "mouth_mid": mouth_mid,
        "u": axis / iod[:, None],
        "d": down / em[:, None],
        "iod": iod,
        "em": em,
        "mouth_width": (lm[:, 4] - lm[:, 3]).norm(dim=1).clamp_min(1e-3),
    }


def _fill_ellipse(labels, value, centre, axis_a, semi_a, axis_b, semi_b) -> None:
    """Set ``labels`` [B,H,W] to ``value`` inside ellipses given by centre and two (not necessarily
    orthogonal) unit axis directions with their semi-axes; one batched test over every pixel.
    """
    h, w = labels.shape[-2:]
    rows_a = axis_a / semi_a[:, None]  # p -> (a, b) coordinates: a = rows_a . (p - centre)
    rows_b = axis_b / semi_b[:, None]
    xs = torch.arange(w, dtype=torch.float32, device=labels.device)[None, None, :] - centre[:, 0, None, None]
    ys = torch.arange(h, dtype=torch.float32, device=labels.device)[None, :, None] - centre[:, 1, None, None]
    a = xs * rows_a[:, 0, None, None] + ys * rows_a[:, 1, None, None]
    b = xs * rows_b[:, 0, None, None] + ys * rows_b[:, 1, None, None]
    labels.masked_fill_(a * a + b * b <= 1.0, value)


def _perp(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([-v[:, 1], v[:, 0]], dim=1)


def landmark_label_map(landmarks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Label map ``[B,H,W]`` (uint8 indices into MASK_LABELS) drawn from 5 landmarks per face."""
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    lm = _check_landmarks(landmarks)
    f = face_frame(lm)
    u, d, iod, em = f["u"], f["d"], f["iod"], f["em"]
    labels = torch.zeros(lm.shape[0], height, width, dtype=torch.uint8, device=lm.device)

    cu, cd, su, sd = _FACE_OVAL
    centre = f["eye_mid"] + (cu * iod)[:, None] * u + (cd * em)[:, None] * d
    _fill_ellipse(labels, MASK_LABELS.index("skin"), centre, u, su * iod, d, sd * em)

    to_tip = lm[:, 2] - f["eye_mid"]
    nose_len = to_tip.norm(dim=1).clamp_min(1e-3)
    nose_dir = to_tip / nose_len[:, None]
    start, end = _NOSE_SPAN
    centre = f["eye_mid"] + ((start + end) / 2 * nose_len)[:, None] * nose_dir
    nose_semi = (end - start) / 2 * nose_len
    _fill_ellipse(
        labels,
        MASK_LABELS.index("nose"),
        centre,
        nose_dir,
        nose_semi,
        _perp(nose_dir),
        _NOSE_HALF_WIDTH * iod,
    )

    for k in (0, 1):
        _fill_ellipse(
            labels, MASK_LABELS.index("eyes"), lm[:, k], u, _EYE_SEMI[0] * iod, _perp(u), _EYE_SEMI[1] * iod
        )

    mw = f["mouth_width"]
    mouth_axis = (lm[:, 4] - lm[:, 3]) / mw[:, None]
    semis = (_MOUTH_SEMI[0] * mw, _MOUTH_SEMI[1] * mw)
    _fill_ellipse(
        labels, MASK_LABELS.index("mouth"), f["mouth_mid"], mouth_axis, semis[0], _perp(mouth_axis), semis[1]
    )
    return labels


def one_hot_mask(labels: torch.Tensor, num_classes: int = len(MASK_LABELS)) -> torch.Tensor:
    """Label map ``[B,H,W]`` -> float one-hot ``[B,K,H,W]``."""
    classes = torch.arange(num_classes, dtype=labels.dtype, device=labels.device)
    return (labels[:, None] == classes[None, :, None, None]).float()


def landmark_mask(landmarks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One-hot facial region mask ``[B,5,H,W]`` (classes MASK_LABELS) from landmarks ``[B,5,2]``."""
    return one_hot_mask(landmark_label_map(landmarks, height, width))


def eye_mouth_boxes(landmarks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Square boxes ``[B,3,4]`` (x1, y1, x2, y2; left eye, right eye, mouth) clipped to the crop."""
    lm = _check_landmarks(landmarks)
    h, w = (size, size) if isinstance(size, int) else size
    f = face_frame(lm)
    eye_half = _EYE_BOX_HALF * f["iod"]
    mouth_half = _MOUTH_BOX_HALF * f["mouth_width"]
    centres = torch.stack([lm[:, 0], lm[:, 1], f["mouth_mid"]], dim=1)  # [B,3,2]
    half = torch.stack([eye_half, eye_half, mouth_half], dim=1)[..., None]  # [B,3,1]
    boxes = torch.cat([centres - half, centres + half], dim=-1)
    limits = torch.tensor([w, h, w, h], dtype=torch.float32)
    return torch.minimum(boxes.clamp_min(0.0), limits)


def detect_crop_landmarks(
    images: torch.Tensor, template: str = "ffhq", backend: str = "dlib"
) -> tuple[torch.Tensor, list[bool]]:
    """Landmarks ``[B,5,2]`` of the largest face of each aligned crop, and which ones were found.

    A crop where the detector finds nothing (heavily degraded input) gets the template's
    landmarks: the crop is aligned to that template, so they are the best guess left.
    """
    from ..face_detection import detect_faces

    b, _, h, w = images.shape
    # upsample=0: faces of aligned crops are large; doubling the image only costs time.
    faces = detect_faces(images, backend=backend, max_faces=1, upsample=0)
    fallback = template_points(template, 1) + 0.5  # unit square
    scale = np.array([w, h], dtype=np.float64)
    out = np.repeat((fallback * scale - 0.5)[None], b, axis=0).astype(np.float32)
    found = [False] * b
    for face in faces:
        out[face.image_index] = face.landmarks
        found[face.image_index] = True
    if not all(found):
        log.warning(
            "no face found by %s in %d of %d crop(s); their masks use the %s template landmarks",
            backend,
            found.count(False),
            b,
            template,
        )
    return torch.from_numpy(out), found
