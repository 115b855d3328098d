"""Facial semantic masks from class-agnostic SAM, prompted by the five landmarks of aligned faces.

Input: aligned face crops (FFHQ-style framing) and their five landmarks in crop pixels (given, or
found with ``detect_faces(backend="dlib")``; a crop where dlib finds nothing falls back to the
alignment template's points, which is where an aligned face's landmarks are by construction).

**Face frame.** Every prompt and region is placed in a frame built from the landmarks: origin at
the eye midpoint, ``a`` along the eye line (towards the image-right eye), ``b`` perpendicular to
it (towards the chin), both in units of the inter-ocular distance ``d``. On the FFHQ template the
nose tip is at b = 0.59 and the mouth corners at (+-0.44, 1.04). Rectangles in this frame are
rotated with the face; SAM gets their axis-aligned bounding boxes.

**Prompted mode** (:func:`prompted_label_map`). The image embedding is computed once
(``SamPredictor.set_image``: SAM's own resizing and normalisation), then every part is prompted
(frame coordinates; ``+`` positive point, ``-`` negative point):

- each eye (class eyes): ``+`` the eye landmark; box eye +-(0.30, 0.17).
- each brow (brows): ``+`` eye + (-+0.05, -0.33) (outwards and up); ``-`` the eye landmark.
- nose (nose): ``+`` the nose tip; box a = tip +-0.28, b from 0.12 to max(tip + 0.12, 0.3).
- mouth (mouth): ``+`` the mouth centre; box from the corners, +-0.10 along a, +-0.20 along b.
- face (skin): box a +-1.05, b from -0.85 to mouth + 0.70; ``+`` forehead (0, -0.45), cheeks
  (+-0.55, 0.60), chin (mouth + 0.45); ``-`` both eyes and the mouth centre.
- hair (hair): ``+`` (0, -1.15) and (+-0.85, -0.85); ``-`` forehead (0, -0.45) and the nose tip.

Prompts with the same number of points and the same box presence go through SAM's mask decoder
as one batch (its prompt encoder needs equal token counts per batch; padding with "not a point"
tokens would add tokens that a single-prompt call does not see). Each prompt yields SAM's
multimask outputs (3) with predicted IoUs. ``selection="score"`` keeps the highest predicted IoU; ``selection="plausible"`` (default)
keeps the highest-scoring *plausible* one, falling back to the highest score when none is:
plausible means non-empty, at least half of it inside the part's *zone*, and no larger than the
zone's area times the factor in ``_AREA_FACTOR`` (1 for eyes, brows, nose, mouth; 1.5 for skin;
3 for hair). Zones are generous landmark-derived regions: the prompt rectangles enlarged
(``_ZONE_SCALE``; brows: rectangle (0.35, 0.13) half-sizes around the brow point), the face
ellipse inscribed in the face box, and for hair the band between that ellipse and a head ellipse
(1.4x larger, raised by 0.3 d) above the mouth line. Eye, brow, nose and mouth masks are then
clipped to their zones, so one wrong mask cannot paint a part across the face.

The label map is composed by priority: eyes over brows over mouth over nose over skin over hair
over background; it comes out one-hot ``[B,K,H,W]`` with ``MASK_LABELS``.

**Automatic mode** (:func:`automatic_instances`). ``SamAutomaticMaskGenerator`` on a
``points_per_side`` grid (no crop layers) yields class-agnostic masks; they are sorted by area
(id 1 = largest) and painted largest first, so a smaller mask stays visible on a larger one:
an instance map ``[B,1,H,W]`` (int64, 0 = no mask). :func:`instances_to_labels` turns it into the
semantic map: because zones are nested (an eye zone lies inside the face ellipse), "overlaps
most" is decided by walking the parts in priority order and giving a mask to the first part
whose zone holds at least ``min_inside`` (0.6) of the mask's pixels; a mask no zone holds is
background. Pixels take the class of the instance on top of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..face_align import TEMPLATES
from ..progress import progress_bar
from .bundle import PriorBundle
from .sam_loading import LoadedSam

log = logging.getLogger(__name__)

MASK_LABELS = ("background", "skin", "brows", "eyes", "nose", "mouth", "hair")
# Highest priority first: a pixel claimed by several parts takes the first of them.
PRIORITY = ("eyes", "brows", "mouth", "nose", "skin", "hair")
FACE_CLASSES = ("skin", "brows", "eyes", "nose", "mouth")  # the face region (hair excluded)
MODES = ("prompted", "automatic")
SELECTIONS = ("plausible", "score")
# Part (instance) -> semantic class.
PART_CLASS = {
    "left_eye": "eyes",
    "right_eye": "eyes",
    "left_brow": "brows",
    "right_brow": "brows",
    "nose": "nose",
    "mouth": "mouth",
    "face": "skin",
    "hair": "hair",
}
_SMALL_PARTS = ("left_eye", "right_eye", "left_brow", "right_brow", "nose", "mouth")
_ZONE_SCALE = {"eye": 1.3, "brow": 1.2, "nose": 1.2, "mouth": 1.25}
_AREA_FACTOR = {"eyes": 1.0, "brows": 1.0, "nose": 1.0, "mouth": 1.0, "skin": 1.5, "hair": 3.0}
MIN_INSIDE = 0.6


@dataclass
class FaceFrame:
    """Landmark-based frame: ``origin`` + ``d * (a * u + b * v)`` maps frame to pixel coordinates."""

    origin: np.ndarray  # eye midpoint, pixels
    u: np.ndarray  # unit vector along the eye line
    v: np.ndarray  # unit vector towards the chin
    d: float  # inter-ocular distance, pixels
    points: np.ndarray  # the five landmarks in frame coordinates [5,2]

    @classmethod
    def from_landmarks(cls, landmarks) -> FaceFrame:
        """Frame of five landmarks ``[5,2]`` (face_types.LANDMARK_NAMES order)."""
        p = np.asarray(landmarks, dtype=np.float64)
        if p.shape != (5, 2) or not np.isfinite(p).all():
            raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {p.shape}")
        axis = p[1] - p[0]
        d = float(np.linalg.norm(axis))
        if d < 1.0:
            raise ValueError(f"the two eye landmarks are {d:.2f} px apart; expected a visible face")
        u = axis / d
        v = np.array([-u[1], u[0]])
        origin = (p[0] + p[1]) / 2
        return cls(origin, u, v, d, cls._project(p, origin, u, v, d))

    @staticmethod
    def _project(p, origin, u, v, d):
        rel = (p - origin) / d
        return np.stack([rel @ u, rel @ v], axis=-1)

    def to_pixels(self, ab) -> np.ndarray:
        """Frame coordinates ``[...,2]`` -> pixel coordinates."""
        ab = np.asarray(ab, dtype=np.float64)
        return self.origin + self.d * (ab[..., :1] * self.u + ab[..., 1:] * self.v)

    def grid(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame coordinates (a, b) of every pixel centre, each ``[H,W]``."""
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
        )
        dx, dy = (xs - self.origin[0]) / self.d, (ys - self.origin[1]) / self.d
        return dx * self.u[0] + dy * self.u[1], dx * self.v[0] + dy * self.v[1]


@dataclass
class PartPrompt:
    """SAM prompt for one part: points (pixels) with labels 1/0 and an optional xyxy box."""

    name: str
    points: np.ndarray  # [N,2] float
    labels: np.ndarray  # [N] int, 1 = on the part, 0 = not on it
    box: np.ndarray | None  # [4] x1, y1, x2, y2


def _rects(frame: FaceFrame) -> dict[str, tuple[float, float, float, float]]:
    """Frame rectangles (a0, a1, b0, b1) of each part's box prompt / zone before enlarging."""
    le, re, nose, ml, mr = frame.points
    mouth = (ml + mr) / 2
    rect = {}
    for name, eye, side in (("left", le, -1.0), ("right", re, 1.0)):
        rect[f"{name}_eye"] = (eye[0] - 0.30, eye[0] + 0.30, eye[1] - 0.17, eye[1] + 0.17)
        ba, bb = eye[0] + 0.05 * side, eye[1] - 0.33
        rect[f"{name}_brow"] = (ba - 0.35, ba + 0.35, bb - 0.13, bb + 0.13)
    rect["nose"] = (nose[0] - 0.28, nose[0] + 0.28, 0.12, max(nose[1] + 0.12, 0.3))
    rect["mouth"] = (ml[0] - 0.10, mr[0] + 0.10, mouth[1] - 0.20, mouth[1] + 0.20)
    rect["face"] = (-1.05, 1.05, -0.85, mouth[1] + 0.70)
    return rect


def _box(frame: FaceFrame, rect, height: int, width: int) -> np.ndarray:
    a0, a1, b0, b1 = rect
    corners = frame.to_pixels(np.array([[a0, b0], [a1, b0], [a0, b1], [a1, b1]]))
    lo = np.clip(corners.min(0), 0, [width - 1, height - 1])
    hi = np.clip(corners.max(0), 0, [width - 1, height - 1])
    return np.concatenate([lo, hi])


def part_prompts(landmarks, height: int, width: int) -> list[PartPrompt]:
    """SAM prompts for each part of a face (table in the module docstring), in crop pixels."""
    frame = FaceFrame.from_landmarks(landmarks)
    le, re, nose, ml, mr = frame.points
    mouth = (ml + mr) / 2
    rect = _rects(frame)
    specs = [
        ("left_eye", [le], [1], rect["left_eye"]),
        ("right_eye", [re], [1], rect["right_eye"]),
        ("left_brow", [le + (-0.05, -0.33), le], [1, 0], None),
        ("right_brow", [re + (0.05, -0.33), re], [1, 0], None),
        ("nose", [nose], [1], rect["nose"]),
        ("mouth", [mouth], [1], rect["mouth"]),
        (
            "face",
            [(0, -0.45), (-0.55, 0.6), (0.55, 0.6), mouth + (0, 0.45), le, re, mouth],
            [1, 1, 1, 1, 0, 0, 0],
            rect["face"],
        ),
        ("hair", [(0, -1.15), (-0.85, -0.85), (0.85, -0.85), (0, -0.45), nose], [1, 1, 1, 0, 0], None),
    ]
    limit = np.array([width - 1, height - 1], dtype=np.float64)
    prompts = []
    for name, pts, labels, r in specs:
        xy = np.clip(frame.to_pixels(np.array(pts, dtype=np.float64)), 0, limit)
        box = None if r is None else _box(frame, r, height, width)
        prompts.append(PartPrompt(name, xy.astype(np.float32), np.array(labels, np.int64), box))
    return prompts


def _in_rect(a, b, rect, scale: float = 1.0) -> torch.Tensor:
    a0, a1, b0, b1 = rect
    ca, cb, ha, hb = (a0 + a1) / 2, (b0 + b1) / 2, (a1 - a0) / 2 * scale, (b1 - b0) / 2 * scale
    return ((a - ca).abs() <= ha) & ((b - cb).abs() <= hb)


def _in_ellipse(a, b, ca, cb, ra, rb) -> torch.Tensor:
    return ((a - ca) / ra) ** 2 + ((b - cb) / rb) ** 2 <= 1.0


def part_zones(landmarks, height: int, width: int) -> dict[str, torch.Tensor]:
    """Generous landmark-derived region of each part (bool ``[H,W]``), keyed like PART_CLASS."""
    frame = FaceFrame.from_landmarks(landmarks)
    a, b = frame.grid(height, width)
    rect = _rects(frame)
    zones = {}
    for name in _SMALL_PARTS:
        zones[name] = _in_rect(a, b, rect[name], _ZONE_SCALE[name.split("_")[-1]])
    a0, a1, b0, b1 = rect["face"]
    ca, cb, ra, rb = (a0 + a1) / 2, (b0 + b1) / 2, (a1 - a0) / 2, (b1 - b0) / 2
    zones["face"] = _in_ellipse(a, b, ca, cb, ra, rb)
    mouth_b = float(frame.points[3:, 1].mean())
    head = _in_ellipse(a, b, ca, cb - 0.3, ra * 1.4, rb * 1.4)
    zones["hair"] = head & ~zones["face"] & (b < mouth_b)
    return zones


def compose_labels(class_masks: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Label map ``[H,W]`` (int64 indices into MASK_LABELS) from per-class bool masks, by PRIORITY."""
    unknown = set(class_masks) - set(PRIORITY)
    if unknown:
        raise ValueError(f"unknown mask classes {sorted(unknown)}; expected some of {PRIORITY}")
    labels = torch.zeros(height, width, dtype=torch.int64)
    for name in reversed(PRIORITY):  # lowest priority first, so higher ones paint over it
        if name in class_masks:
            labels[class_masks[name].bool()] = MASK_LABELS.index(name)
    return labels


def one_hot_labels(label_maps: torch.Tensor) -> torch.Tensor:
    """Label maps ``[B,H,W]`` -> one-hot float32 ``[B,K,H,W]`` over MASK_LABELS."""
    k = len(MASK_LABELS)
    return torch.nn.functional.one_hot(label_maps.long(), k).permute(0, 3, 1, 2).float().contiguous()


def _choose(masks: torch.Tensor, scores: torch.Tensor, zone: torch.Tensor, part: str, selection: str) -> int:
    """Index of the multimask output to keep (see ``selection`` in the module docstring)."""
    if selection == "score":
        return int(scores.argmax())
    areas = masks.flatten(1).sum(1).double()
    inside = (masks & zone).flatten(1).sum(1).double()
    limit = float(zone.sum()) * _AREA_FACTOR[PART_CLASS[part]]
    ok = (areas > 0) & (inside >= 0.5 * areas) & (areas <= limit)
    if not ok.any():
        return int(scores.argmax())
    return int(torch.where(ok, scores, torch.full_like(scores, -torch.inf)).argmax())


def _to_uint8_hwc(image_chw: torch.Tensor) -> np.ndarray:
    arr = (image_chw.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(
        np.uint8
    )
    return np.ascontiguousarray(arr)


def predict_part_masks(predictor, prompts: list[PartPrompt], height: int, width: int) -> dict:
    """name -> (masks bool ``[M,H,W]``, predicted IoUs ``[M]``) for prompts on the set image."""
    groups: dict[tuple[int, bool], list[PartPrompt]] = {}
    for p in prompts:
        groups.setdefault((len(p.points), p.box is not None), []).append(p)
    device = predictor.device
    out = {}
    for (_, has_box), group in groups.items():
        coords = torch.as_tensor(np.stack([p.points for p in group]), dtype=torch.float32, device=device)
        coords = predictor.transform.apply_coords_torch(coords, (height, width))
        labels = torch.as_tensor(np.stack([p.labels for p in group]), dtype=torch.int64, device=device)
        boxes = None
        if has_box:
            boxes = torch.as_tensor(np.stack([p.box for p in group]), dtype=torch.float32, device=device)
            boxes = predictor.transform.apply_boxes_torch(boxes, (height, width))
        masks, scores, _ = predictor.predict_torch(coords, labels, boxes, multimask_output=True)
        for i, p in enumerate(group):
            out[p.name] = (masks[i].cpu(), scores[i].float().cpu())
    return out


def prompted_label_map(
    sam: LoadedSam, image_chw: torch.Tensor, landmarks, selection: str = "plausible"
) -> torch.Tensor:
    """Semantic label map ``[H,W]`` (int64, MASK_LABELS indices) of one aligned face, prompted mode."""
    from segment_anything import SamPredictor  # lazy: imports torchvision

    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    _, height, width = image_chw.shape
    predictor = SamPredictor(sam.model)
    predictor.set_image(_to_uint8_hwc(image_chw))  # the one image embedding for every prompt
    zones = part_zones(landmarks, height, width)
    found = predict_part_masks(predictor, part_prompts(landmarks, height, width), height, width)
    class_masks: dict[str, torch.Tensor] = {}
    for name, (masks, scores) in found.items():
        mask = masks[_choose(masks, scores, zones[name], name, selection)]
        if name in _SMALL_PARTS:
            mask = mask & zones[name]
        cls = PART_CLASS[name]
        class_masks[cls] = class_masks[cls] | mask if cls in class_masks else mask
    return compose_labels(class_masks, height, width)


def automatic_instances(
    sam: LoadedSam,
    image_chw: torch.Tensor,
    points_per_side: int = 16,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    box_nms_thresh: float = 0.7,
) -> torch.Tensor:
    """Instance map ``[H,W]`` (int64; 0 = none, 1 = largest mask) from SAM's automatic generator."""
    from segment_anything import SamAutomaticMaskGenerator  # lazy: imports torchvision

    if points_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    generator = SamAutomaticMaskGenerator(
        sam.model,
        points_per_side=int(points_per_side),
        pred_iou_thresh=float(pred_iou_thresh),
        stability_score_thresh=float(stability_score_thresh),
        box_nms_thresh=float(box_nms_thresh),
        crop_n_layers=0,
        min_mask_region_area=0,
        output_mode="binary_mask",
    )
    records = generator.generate(_to_uint8_hwc(image_chw))
    _, height, width = image_chw.shape
    instances = torch.zeros(height, width, dtype=torch.int64)
    # Largest first (ties: the generator's order), so smaller masks are painted on top.
    order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
    for rank, i in enumerate(order, start=1):
        instances[torch.from_numpy(np.asarray(records[i]["segmentation"], dtype=bool))] = rank
    return instances


def instance_classes(instances: torch.Tensor, landmarks, min_inside: float = MIN_INSIDE) -> dict[int, str]:
    """Instance id -> semantic class (see module docstring); ids not listed are background."""
    height, width = instances.shape
    zones = part_zones(landmarks, height, width)
    by_priority = sorted(PART_CLASS, key=lambda n: PRIORITY.index(PART_CLASS[n]))
    classes = {}
    for ident in torch.unique(instances).tolist():
        if ident == 0:
            continue
        mask = instances == ident
        area = float(mask.sum())
        for name in by_priority:
            if float((mask & zones[name]).sum()) >= min_inside * area:
                classes[ident] = PART_CLASS[name]
                break
    return classes


def instances_to_labels(instances: torch.Tensor, landmarks, min_inside: float = MIN_INSIDE) -> torch.Tensor:
    """Semantic label map ``[H,W]`` from an instance map ``[H,W]`` and the face's landmarks."""
    if instances.dim() != 2:
        raise ValueError(f"instance map must be [H,W], got {tuple(instances.shape)}")
    lookup = torch.zeros(int(instances.max()) + 1, dtype=torch.int64)
    for ident, cls in instance_classes(instances, landmarks, min_inside).items():
        lookup[ident] = MASK_LABELS.index(cls)
    return lookup[instances.long()]


def face_landmarks(images_bchw: torch.Tensor, template: str = "ffhq") -> tuple[np.ndarray, list[bool]]:
    """Landmarks ``[B,5,2]`` of aligned crops from dlib, template points where none is found."""
    from ..face_detection import detect_faces

    b, _, h, w = images_bchw.shape
    found = {f.image_index: f.landmarks for f in detect_faces(images_bchw, backend="dlib", max_faces=1)}
    if template not in TEMPLATES:
        raise ValueError(f"unknown face template {template!r}; expected one of {sorted(TEMPLATES)}")
    fallback = TEMPLATES[template] * np.array([w, h]) - 0.5  # face_align's unit-square convention
    missing = [i not in found for i in range(b)]
    if any(missing):
        log.warning(
            "dlib found no face in %d of %d crop(s): using the %s template landmarks",
            sum(missing),
            b,
            template,
        )
    return np.stack([found.get(i, fallback) for i in range(b)]).astype(np.float32), missing


def _check_landmarks(landmarks, batch: int) -> np.ndarray:
    arr = np.asarray(
        landmarks.detach().cpu() if isinstance(landmarks, torch.Tensor) else landmarks, np.float64
    )
    if arr.shape != (batch, 5, 2):
        raise ValueError(f"landmarks must be [{batch},5,2] (one set per image), got {arr.shape}")
    return arr


@dataclass
class SamMaskResult:
    """Output of :func:`sam_face_masks` for a batch of faces."""

    one_hot: torch.Tensor  # [B,K,H,W] float32 over MASK_LABELS
    landmarks: np.ndarray  # [B,5,2] used for the prompts / zones
    instances: torch.Tensor | None  # [B,1,H,W] int64 in automatic mode, else None
    settings: dict


def sam_face_masks(
    sam: LoadedSam,
    images_bchw: torch.Tensor,
    landmarks=None,
    mode: str = "prompted",
    selection: str = "plausible",
    points_per_side: int = 16,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    template: str = "ffhq",
) -> SamMaskResult:
    """Semantic masks of aligned faces (BCHW 0..1) with SAM, prompted or automatic (module docstring)."""
    if not isinstance(images_bchw, torch.Tensor) or images_bchw.dim() != 4 or images_bchw.shape[1] != 3:
        raise ValueError(f"images must be an RGB [B,3,H,W] tensor, got {getattr(images_bchw, 'shape', None)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    images = images_bchw.detach().float().clamp(0, 1).cpu()
    b = images.shape[0]
    if landmarks is None:
        points, _ = face_landmarks(images, template)
        source = "dlib"
    else:
        points, source = _check_landmarks(landmarks, b), "given"
    labels, instances = [], []
    with progress_bar(b, f"SAM face masks ({mode})") as bar:
        for i in range(b):
            if mode == "prompted":
                labels.append(prompted_label_map(sam, images[i], points[i], selection))
            else:
                inst = automatic_instances(
                    sam, images[i], points_per_side, pred_iou_thresh, stability_score_thresh
                )
                instances.append(inst)
                labels.append(instances_to_labels(inst, points[i]))
            bar.update(1)
    settings = {"mode": mode, "labels": list(MASK_LABELS), "landmarks": source}
    if mode == "prompted":
        settings["selection"] = selection
    else:
        settings.update(
            points_per_side=int(points_per_side),
            pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh),
            min_inside=MIN_INSIDE,
        )
    return SamMaskResult(
        one_hot_labels(torch.stack(labels)),
        np.asarray(points, np.float32),
        torch.stack(instances).unsqueeze(1) if instances else None,
        settings,
    )


def with_sam_mask(bundle: PriorBundle | None, sam: LoadedSam, result: SamMaskResult) -> PriorBundle:
    """A bundle (new or a copy of ``bundle``) with the mask prior and its provenance set."""
    batch = result.one_hot.shape[0]
    bundle = bundle if bundle is not None else PriorBundle(batch_size=batch)
    source = {"extractor": sam.extractor_id, "settings": dict(result.settings)}
    return replace(bundle.with_prior("mask", result.one_hot, source), mask_labels=MASK_LABELS)


def face_region(one_hot: torch.Tensor) -> torch.Tensor:
    """Face region ``[B,H,W]`` in {0,1}: skin and facial parts (hair and background excluded)."""
    idx = [MASK_LABELS.index(c) for c in FACE_CLASSES]
    return one_hot[:, idx].sum(1).clamp(0, 1)
