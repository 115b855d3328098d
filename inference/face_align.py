"""Face alignment to a 5-point template, and paste-back of restored crops into the photos.

Coordinates follow inference/face_types.py: pixel centres at integers, so pixel ``i`` of an
``S``-pixel side covers ``[i - 0.5, i + 0.5]`` and the image spans ``[-0.5, S - 0.5]``. Templates
are stored in the unit square (``u = (p + 0.5) / S``) and scaled as ``p = u * S - 0.5``, which
keeps a crop of any size framing exactly the same region (facexlib's plain ``p * S / 512`` drifts
by up to half a pixel).

Warping uses ``torch.nn.functional.grid_sample`` rather than ``cv2.warpAffine``: it runs on the
tensors' device, in float32 (OpenCV works on 8-bit with weights rounded to 1/32 pixel), and is
given exact inverse maps built from the affine, so align -> paste is a true round trip. When a
warp shrinks (a large face to a small crop, or a big restored crop into a small footprint), the
source is first reduced (Lanczos-3; see ``_OVERSAMPLE``) so the warp does not alias. Only the region
a face covers is ever sampled, so huge photos with many small faces stay cheap.

Faces crossing the photo's edge: border="reflect" mirrors the photo into the crop; "constant"
samples the same way and then blacks out, with a hard cut, what lies beyond the edge (zero padding
inside the interpolation would darken the pixels just inside it too). Before pasting, crop pixels
beyond the edge are replaced by their mirror image, so neither mode leaves a seam there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .color_correction import COLOR_CORRECTIONS, apply_color_correction
from .face_types import AlignedFace, DetectedFace, FaceData
from .images import resize_bchw
from .progress import progress_bar

log = logging.getLogger(__name__)

# facexlib/GFPGAN 5-point template for a 512x512 FFHQ-aligned crop, in pixels.
_FFHQ_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)

# UTKFace's aligned 200x200 crops (tighter than FFHQ: the face is 1.57x larger), unit square.
# Derived by scripts/measure_template.py (--utkface-count 400 --seed 0): dlib's 5-point model
# (eye corners, nose base) run on the 55 FFHQ-aligned faces in shared/data/faces (dev/ffhq,
# dev/pairs/hq, real-lq; 51 measured) and on 400 random UTKFace crops (395 measured); the mean eye
# centres and nose base of each set give a least-squares similarity FFHQ -> UTKFace (max residual
# 0.004 of the side), applied to the FFHQ template above, so dlib's own bias cancels out.
_UTKFACE_UNIT = np.array(
    [
        [0.29890, 0.29054],
        [0.68583, 0.29303],
        [0.49347, 0.51903],
        [0.32253, 0.69462],
        [0.66616, 0.69537],
    ]
)

TEMPLATES: dict[str, np.ndarray] = {
    "ffhq": (_FFHQ_512 + 0.5) / 512.0,
    "utkface": _UTKFACE_UNIT,
}

# Mean dlib eye centres and nose base in FFHQ-aligned crops (unit square), measured by
# scripts/measure_template.py on the FFHQ-aligned faces listed above.
_DLIB3_IN_FFHQ = np.array([[0.37695, 0.47986], [0.62525, 0.48076], [0.50350, 0.65849]])

BORDERS = ("reflect", "constant")
INTERPOLATIONS = ("bilinear", "bicubic")
# Prefilter only warps that shrink more than this, down to this many source pixels per output
# pixel; the final bicubic sample does the rest. Measured on 4 photos (align -> paste round trip)
# and a sine grating above the output's Nyquist rate: prefiltering every shrink to 1:1 blurs
# (mean round-trip error 0.9-2.3/255, each resampling attenuates detail), never prefiltering
# aliases fully; 2 keeps the round trip at 0.14-0.35/255 and removes most aliasing beyond 3:1.
_OVERSAMPLE = 2.0
_PADDING = {"reflect": "reflection", "constant": "zeros"}


def template_points(name: str, size: int) -> np.ndarray:
    """Template landmarks ``[5, 2]`` in pixels of a ``size`` x ``size`` crop."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown face template {name!r}; expected one of {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name] * size - 0.5


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src -> dst, 2x3."""
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(
            f"expected two [N,2] point sets with N >= 2, got {tuple(src.shape)} and {tuple(dst.shape)}"
        )
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks contain NaN or infinite values")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("source landmarks all coincide; cannot estimate a similarity")
    # Umeyama (1991): rotation from the SVD of the cross-covariance, sign-fixed to exclude mirroring.
    u, d, vt = np.linalg.svd(xd.T @ xs / len(src))
    s = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ np.diag(s) @ vt
    scale = float((d * s).sum() / var_s)
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def apply_affine(points, affine: np.ndarray) -> np.ndarray:
    """Points ``[..., 2]`` (pixel-centre coordinates) mapped by a 2x3 affine, as float64."""
    return np.asarray(points, dtype=np.float64) @ affine[:, :2].T + affine[:, 2]


def rescale_points(points, sx: float, sy: float | None = None):
    """Pixel-centre points ``[..., 2]`` (numpy or torch) in a picture resized by ``sx`` x ``sy`` (``sy``: ``sx``)."""
    scale = [sx, sx if sy is None else sy]
    scale = torch.tensor(scale, dtype=points.dtype) if torch.is_tensor(points) else np.array(scale)
    return (points + 0.5) * scale - 0.5


def mirror_landmarks(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """5-point landmarks ``[..., 5, 2]`` of a horizontally flipped ``size``-wide crop: x mirrored, left/right swapped."""
    out = landmarks[..., [1, 0, 2, 4, 3], :].clone()
    out[..., 0] = size - 1 - out[..., 0]
    return out


def _mat3(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, dtype=np.float64)[:2], [0.0, 0.0, 1.0]])


def _rescale(sx: float, sy: float) -> np.ndarray:
    """Pixel coordinates of an image -> those of the same image resized by (sx, sy)."""
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def _normalise(h: int, w: int) -> np.ndarray:
    """Pixel coordinates -> grid_sample's [-1, 1] coordinates (align_corners=False)."""
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def _source_window(dst_to_src: np.ndarray, out_h: int, out_w: int, h: int, w: int, reflect: bool, margin):
    """Integer source window [x0, x1] x [y0, y1] that every output sample can reach."""
    corners = np.array(
        [[-0.5, -0.5, 1], [out_w - 0.5, -0.5, 1], [-0.5, out_h - 0.5, 1], [out_w - 0.5, out_h - 0.5, 1]]
    )
    pts = corners @ dst_to_src[:2].T
    window = []
    for axis, size in ((0, w), (1, h)):
        lo, hi = pts[:, axis].min() - margin, pts[:, axis].max() + margin
        if reflect:  # samples beyond an edge read their mirror image inside it
            hi = max(hi, -1.0 - lo) if lo < -0.5 else hi
            lo = min(lo, 2.0 * size - 1.0 - hi) if hi > size - 0.5 else lo
        lo_i = min(max(math.floor(lo), 0), size - 1)
        hi_i = max(min(math.ceil(hi), size - 1), lo_i)
        window += [lo_i, hi_i]
    return window


def _lanczos_weights(n_out: int, n_in: int, device) -> torch.Tensor:
    """[n_out, n_in] Lanczos-3 weights for shrinking one axis, stretched by the shrink factor."""
    f = n_in / n_out
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * f - 0.5
    d = (torch.arange(n_in, dtype=torch.float64)[None, :] - centres[:, None]) / max(f, 1.0)
    w = torch.sinc(d) * torch.sinc(d / 3.0) * (d.abs() < 3.0)
    return (w / w.sum(1, keepdim=True)).to(device, torch.float32)


def _lanczos_resize(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Antialiased Lanczos-3 resize of BCHW ``x`` (rows renormalised at the borders)."""
    wy = _lanczos_weights(out_h, x.shape[-2], x.device)
    wx = _lanczos_weights(out_w, x.shape[-1], x.device)
    return torch.matmul(torch.matmul(wy, x), wx.T)


def _warp(
    src: torch.Tensor, dst_to_src: np.ndarray, out_h: int, out_w: int, mode: str, padding: str
) -> torch.Tensor:
    """Sample ``src`` [1,C,H,W] at ``dst_to_src`` of every output pixel -> [1,C,out_h,out_w]."""
    h, w = src.shape[-2:]
    shrink = math.sqrt(abs(np.linalg.det(dst_to_src[:2, :2])))  # source pixels per output pixel
    margin = 2.0 * max(shrink, 1.0) + 2.0  # interpolation support, in source pixels
    x0, x1, y0, y1 = _source_window(dst_to_src, out_h, out_w, h, w, padding == "reflection", margin)
    roi = src[..., y0 : y1 + 1, x0 : x1 + 1]
    to_roi = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]]) @ dst_to_src
    if shrink > _OVERSAMPLE:
        # Antialias: reduce the window to twice the output's sampling rate before sampling.
        rh, rw = roi.shape[-2:]
        factor = shrink / _OVERSAMPLE
        nh, nw = max(1, round(rh / factor)), max(1, round(rw / factor))
        if mode == "bicubic":
            roi = _lanczos_resize(roi, nh, nw)
        else:  # masks: a non-negative filter, so zero stays exactly zero and nothing rings
            roi = F.interpolate(roi, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        to_roi = _rescale(nw / rw, nh / rh) @ to_roi
    theta = _normalise(*roi.shape[-2:]) @ to_roi @ np.linalg.inv(_normalise(out_h, out_w))
    theta_t = torch.as_tensor(theta[:2], dtype=torch.float32, device=src.device)[None]
    grid = F.affine_grid(theta_t, [1, src.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(roi, grid, mode=mode, padding_mode=padding, align_corners=False)


def warp_affine(
    image: torch.Tensor,
    affine: np.ndarray,
    out_size: tuple[int, int],
    mode: str = "bicubic",
    border: str = "reflect",
) -> torch.Tensor:
    """Warp BCHW ``image`` by ``affine`` (2x3, source pixel -> output pixel) to ``out_size`` (h, w)."""
    _check_choice("interpolation", mode, INTERPOLATIONS)
    _check_choice("border", border, BORDERS)
    inv = np.linalg.inv(_mat3(affine))
    out = [_warp(image[i : i + 1].float(), inv, *out_size, mode, _PADDING[border]) for i in range(len(image))]
    return torch.cat(out).clamp(0.0, 1.0)


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(
            f"{name} must be a BCHW tensor, got {getattr(images, 'shape', type(images).__name__)}"
        )


def _align_one(image: torch.Tensor, affine: np.ndarray, size: int, mode: str, border: str) -> torch.Tensor:
    crop = warp_affine(image, affine, (size, size), mode, "reflect")
    if border == "constant":
        # Sample with reflection and then cut hard at the photo's edge: zero padding inside the
        # interpolation would also darken the crop pixels just inside the edge.
        crop_to_src = np.linalg.inv(_mat3(affine))
        outside = _outside(_crop_to_source_points(crop_to_src, size), *image.shape[-2:])
        crop = crop.masked_fill(outside.to(crop.device), 0.0)
    return crop


def align_faces(
    images_bchw: torch.Tensor,
    faces: Sequence[DetectedFace],
    template: str = "ffhq",
    size: int = 512,
    border: str = "reflect",
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, FaceData]:
    """Crop every face to a ``size`` square aligned to ``template`` -> (crops [N,C,size,size], FaceData)."""
    _check_images(images_bchw)
    _check_choice("border", border, BORDERS)
    _check_choice("interpolation", interpolation, INTERPOLATIONS)
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"crop size must be an integer >= 8, got {size!r}")
    dst = template_points(template, size)
    b, c, h, w = images_bchw.shape
    aligned, crops = [], []
    with progress_bar(len(faces), "Aligning faces") as bar:
        for face in faces:
            if not 0 <= face.image_index < b:
                raise ValueError(f"face image_index {face.image_index} is outside the batch of {b} images")
            lm = np.asarray(face.landmarks, dtype=np.float64)
            if lm.shape != (5, 2):
                raise ValueError(f"face landmarks must be [5,2], got {tuple(lm.shape)}")
            affine = estimate_similarity(lm, dst)
            i = face.image_index
            crops.append(_align_one(images_bchw[i : i + 1], affine, size, interpolation, border))
            aligned.append(AlignedFace(face=face, affine=affine, crop_size=size, template=template))
            bar.update()
    empty = images_bchw.new_zeros((0, c, size, size), dtype=torch.float32)
    data = FaceData(image_sizes=[(h, w)] * b, faces=aligned)
    return (torch.cat(crops) if crops else empty), data


def _crop_to_source_points(crop_to_src: np.ndarray, side: int) -> torch.Tensor:
    """Photo coordinates ``[side, side, 2]`` (x, y) of every crop pixel centre."""
    yy, xx = torch.meshgrid(*(torch.arange(side, dtype=torch.float64),) * 2, indexing="ij")
    return torch.stack([xx, yy, torch.ones_like(xx)], -1) @ torch.from_numpy(crop_to_src[:2]).T


def _outside(pts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    limits = torch.tensor([w, h], dtype=torch.float64)
    return ((pts < -0.5) | (pts > limits - 0.5)).any(-1)


def _mirror_outside(crop: torch.Tensor, crop_to_src: np.ndarray, h: int, w: int) -> torch.Tensor:
    """Replace crop pixels that lie beyond the photo's edge by their mirror image inside it.

    Whatever stands there (black for border="constant", or what the restorer made of it), paste-back
    interpolation at the photo's edge would otherwise blend it into the outermost photo pixels.
    """
    side = crop.shape[-1]
    pts = _crop_to_source_points(crop_to_src, side)
    outside = _outside(pts, h, w)
    if not outside.any():
        return crop
    limits = torch.tensor([w, h], dtype=torch.float64)
    mirrored = torch.where(pts < -0.5, -1.0 - pts, pts)
    mirrored = torch.where(mirrored > limits - 0.5, 2.0 * limits - 1.0 - mirrored, mirrored)
    src_to_crop = torch.from_numpy(np.linalg.inv(crop_to_src)[:2])
    back = torch.cat([mirrored, torch.ones_like(mirrored[..., :1])], -1) @ src_to_crop.T
    grid = ((2.0 * back + 1.0) / side - 1.0).to(crop.device, torch.float32)[None]
    inside = (~outside).to(crop.device, crop.dtype)[None, None]
    # Normalised interpolation: a mirrored point just inside the edge must not pick up its
    # outside neighbours' values.
    num = F.grid_sample(crop * inside, grid, mode="bilinear", padding_mode="border", align_corners=False)
    den = F.grid_sample(inside, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(inside > 0, crop, num / den.clamp_min(1e-6))


def _snap(alpha: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Round blend weights within ``eps`` of 0 or 1, so untouched pixels stay bit-exact."""
    alpha = torch.where(alpha < eps, 0.0, alpha)
    return torch.where(alpha > 1.0 - eps, 1.0, alpha)


def _feather_profile(length: int, feather: float) -> torch.Tensor:
    """1-D mask across a crop side: a box eroded from the edges, blurred by a Gaussian."""
    sigma = feather * length / 4.0
    radius = math.ceil(3.0 * sigma) if sigma > 0 else 0
    # Erode by the blur radius plus 2 pixels, so the blurred mask is exactly 0 on the outermost
    # pixels, where interpolation would mix in whatever lies beyond the crop.
    erode = radius + 2
    profile = torch.zeros(length)
    profile[erode : max(erode, length - erode)] = 1.0
    if radius:
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        profile = F.conv1d(profile[None, None], (kernel / kernel.sum())[None, None], padding=radius)[0, 0]
    return _snap(profile)


def feather_mask(height: int, width: int, feather: float) -> torch.Tensor:
    """Soft crop-area mask ``[height, width]``: 1 inside, 0 at the edges, ramp ~``feather`` of a side."""
    return _feather_profile(height, feather)[:, None] * _feather_profile(width, feather)[None, :]


def _crop_list(restored, face_data: FaceData, channels: int) -> list[torch.Tensor]:
    items = list(restored) if not isinstance(restored, torch.Tensor) else list(restored.unsqueeze(1))
    items = [t if t.dim() == 4 else t.unsqueeze(0) for t in items]
    if len(items) != len(face_data.faces):
        raise ValueError(f"got {len(items)} restored crops for {len(face_data.faces)} aligned faces")
    for k, (t, af) in enumerate(zip(items, face_data.faces, strict=True)):
        if t.dim() != 4 or t.shape[:2] != (1, channels):
            raise ValueError(f"restored crop {k} must be [{channels},h,w], got {tuple(t.shape[1:])}")
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(
                f"restored crop {k} is {t.shape[-2]}x{t.shape[-1]} but face {k} was aligned as a "
                f"{af.crop_size}x{af.crop_size} square; expected a square crop of any size"
            )
    return items


def _mask_list(face_masks, n: int) -> list[torch.Tensor | None]:
    if face_masks is None:
        return [None] * n
    masks = face_masks[:, 0] if face_masks.dim() == 4 and face_masks.shape[1] == 1 else face_masks
    if masks.dim() != 3 or len(masks) != n:
        raise ValueError(f"face_masks must be [N,h,w] with N = {n} faces, got {tuple(face_masks.shape)}")
    return list(masks.float().clamp(0.0, 1.0).unsqueeze(1))


def _check_paste_inputs(images: torch.Tensor, face_data: FaceData, upscale, feather, color_correction):
    _check_images(images)
    sizes = [tuple(images.shape[-2:])] * len(images)
    if [tuple(s) for s in face_data.image_sizes] != sizes:
        raise ValueError(f"faces were aligned on images of sizes {face_data.image_sizes}, got {sizes}")
    if not upscale > 0:
        raise ValueError(f"upscale must be > 0, got {upscale}")
    if not 0.0 <= feather <= 0.25:
        raise ValueError(f"feather must be between 0 and 0.25 of the crop side, got {feather}")
    _check_choice("color correction", color_correction, COLOR_CORRECTIONS)


def paste_faces(
    images_bchw: torch.Tensor,
    restored_crops: torch.Tensor | Sequence[torch.Tensor],
    face_data: FaceData,
    upscale: float = 1,
    feather: float = 0.05,
    face_masks: torch.Tensor | None = None,
    color_correction: str = "none",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Blend restored crops (any square size) back into the photos, upscaled by ``upscale``."""
    _check_paste_inputs(images_bchw, face_data, upscale, feather, color_correction)
    b, c, h, w = images_bchw.shape
    images = images_bchw.float()
    crops = _crop_list(restored_crops, face_data, c)
    masks = _mask_list(face_masks, len(crops))
    oh, ow = max(1, round(h * upscale)), max(1, round(w * upscale))
    out = resize_bchw(images, oh, ow, "bicubic").clone()
    out_to_src = _rescale(w / ow, h / oh)
    with progress_bar(len(crops), "Pasting faces") as bar:
        for af, crop, mask in zip(face_data.faces, crops, masks, strict=True):
            i, side = af.face.image_index, crop.shape[-1]
            crop = crop.to(images.device, torch.float32)
            src_to_crop = _rescale(side / af.crop_size, side / af.crop_size) @ _mat3(af.affine)
            if color_correction != "none":
                ref = _warp(
                    images[i : i + 1], np.linalg.inv(src_to_crop), side, side, "bicubic", "reflection"
                )
                crop = apply_color_correction(crop, ref, color_correction)
            crop = _mirror_outside(crop, np.linalg.inv(src_to_crop), h, w)
            soft = feather_mask(side, side, feather).to(images.device)
            if mask is not None:
                soft = soft * resize_bchw(mask[None].to(images.device), side, side, "bilinear")[0, 0]
            out_to_crop = src_to_crop @ out_to_src
            x0, x1, y0, y1 = _source_window(np.linalg.inv(out_to_crop), side, side, oh, ow, False, 1.0)
            win_to_crop = out_to_crop @ np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
            wh, ww = y1 - y0 + 1, x1 - x0 + 1
            fg = _warp(crop, win_to_crop, wh, ww, interpolation, "border").clamp(0.0, 1.0)
            alpha = _snap(_warp(soft[None, None], win_to_crop, wh, ww, "bilinear", "zeros"))
            region = out[i : i + 1, :, y0 : y1 + 1, x0 : x1 + 1]
            # Written so that alpha 0 keeps the photo bit for bit and alpha 1 takes the crop exactly.
            out[i : i + 1, :, y0 : y1 + 1, x0 : x1 + 1] = region * (1.0 - alpha) + fg * alpha
            bar.update()
    return out
