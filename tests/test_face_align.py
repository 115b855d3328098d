"""Face alignment and paste-back: geometry against known transforms and OpenCV, round trips."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from priorface.inference.face_align import (
    TEMPLATES,
    align_faces,
    estimate_similarity,
    paste_faces,
    template_points,
    warp_affine,
)
from priorface.inference.face_detection import dlib_to_retinaface_points
from priorface.inference.face_types import DetectedFace
from priorface.inference.images import resize_bchw

WHOLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "whole"


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def _face(image_index: int, eye_dist: float, angle: float, cx: float, cy: float) -> DetectedFace:
    """A synthetic face: the FFHQ template scaled to ``eye_dist``, rotated, centred at (cx, cy)."""
    unit = TEMPLATES["ffhq"] - 0.5
    k = eye_dist / np.linalg.norm(unit[1] - unit[0])
    lm = unit @ _similarity(k, angle, 0, 0)[:, :2].T + [cx, cy]
    return DetectedFace(image_index, np.zeros(4, np.float32), lm.astype(np.float32), 1.0, "synthetic")


def _texture(h: int, w: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Photo-like test image: two octaves of smooth noise (coarse shapes plus some fine detail)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(batch, 3, h, w)
    for step, weight in ((8, 0.7), (3, 0.3)):
        small = torch.rand(batch, 3, h // step + 1, w // step + 1, generator=g)
        out += weight * F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return out.clamp(0, 1)


def _crop_coords(affine: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return (
        affine[0, 0] * xs + affine[0, 1] * ys + affine[0, 2],
        affine[1, 0] * xs + affine[1, 1] * ys + affine[1, 2],
    )


def _regions(face_data, image_index: int, h: int, w: int, inner=(0.12, 0.88)):
    """(inside: central part of every face, far: outside every crop footprint) as bool [h, w]."""
    inside, near = np.zeros((h, w), bool), np.zeros((h, w), bool)
    for af in face_data.faces:
        if af.face.image_index != image_index:
            continue
        cx, cy = _crop_coords(af.affine, h, w)
        s = af.crop_size
        lo, hi = inner[0] * s, inner[1] * s
        inside |= (cx > lo) & (cx < hi) & (cy > lo) & (cy < hi)
        m = 2.0 + 2.0 * np.hypot(*af.affine[:, 0])  # 2 crop pixels plus 2 photo pixels
        near |= (cx > -m) & (cx < s + m) & (cy > -m) & (cy < s + m)
    return torch.from_numpy(inside), torch.from_numpy(~near)


def _round_trip_errors(image, out, face_data, image_index=0):
    h, w = image.shape[-2:]
    inside, far = _regions(face_data, image_index, h, w)
    err = (out[image_index] - image[image_index]).abs().amax(0)
    return err[inside].mean().item() * 255, err[inside].max().item() * 255, err[far]


# --- geometry --------------------------------------------------------------------------------


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (5, 2))
    truth = _similarity(1.7, -23.0, 31.5, -12.25)
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(estimate_similarity(src, dst), truth, atol=1e-9)


def test_similarity_never_reflects_and_rejects_bad_points():
    src = np.array([[0.0, 0], [3, 0], [0, 1], [1, 2]])
    mirrored = src * [-1, 1]
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(ValueError, match=r"\[N,2\]"):
        estimate_similarity(src, src[:3])
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), src[:1].repeat(5, 0))


def test_templates_scale_from_the_unit_square():
    np.testing.assert_allclose(template_points("ffhq", 512)[0], [192.98138, 239.94708], atol=1e-9)
    np.testing.assert_allclose(template_points("ffhq", 256), (template_points("ffhq", 512) + 0.5) / 2 - 0.5)
    utk = TEMPLATES["utkface"]
    assert ((utk > 0) & (utk < 1)).all()
    assert utk[0, 0] < utk[2, 0] < utk[1, 0] and utk[0, 1] < utk[2, 1] < utk[3, 1]  # eyes, nose, mouth
    # Tighter than FFHQ: a larger inter-ocular distance in the same square.
    assert np.linalg.norm(utk[1] - utk[0]) > 1.4 * np.linalg.norm(TEMPLATES["ffhq"][1] - TEMPLATES["ffhq"][0])
    with pytest.raises(ValueError, match="ffhq, utkface"):
        template_points("arcface", 112)


@pytest.mark.parametrize(
    "mode, flag, tol", [("bilinear", cv2.INTER_LINEAR, 1e-4), ("bicubic", cv2.INTER_CUBIC, 1e-4)]
)
def test_warp_matches_opencv(mode, flag, tol):
    image = _texture(120, 150, seed=3)
    affine = _similarity(1.3, 17.0, -20.0, 35.0)
    ours = warp_affine(image, affine, (140, 160), mode=mode, border="constant")[0].permute(1, 2, 0).numpy()
    src = image[0].permute(1, 2, 0).numpy()
    ref = cv2.warpAffine(src, affine, (160, 140), flags=flag, borderMode=cv2.BORDER_CONSTANT).clip(0, 1)
    inner = (slice(40, 100), slice(40, 120))  # OpenCV's border handling differs; compare the middle
    assert np.abs(ours[inner] - ref[inner]).max() < tol


def test_aligned_landmarks_land_on_the_template():
    h, w = 200, 240
    face = _face(0, eye_dist=60.0, angle=12.0, cx=130.0, cy=95.0)
    image = torch.zeros(1, 3, h, w)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for x, y in face.landmarks:  # a small Gaussian blob on each landmark
        image[0] += torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0**2))
    crops, data = align_faces(image, [face], size=256)
    crop = crops[0, 0]
    target = template_points("ffhq", 256)
    cy_, cx_ = torch.meshgrid(torch.arange(256).float(), torch.arange(256).float(), indexing="ij")
    for tx, ty in target:
        win = ((cx_ - tx).abs() < 12) & ((cy_ - ty).abs() < 12)
        wgt = crop * win
        centroid = np.array([(wgt * cx_).sum() / wgt.sum(), (wgt * cy_).sum() / wgt.sum()])
        assert np.abs(centroid - [tx, ty]).max() < 0.3, (centroid, (tx, ty))
    assert data.image_sizes == [(h, w)] and data.faces[0].crop_size == 256


# --- round trips -----------------------------------------------------------------------------


def test_synthetic_round_trip_is_exact_away_from_faces():
    image = _texture(300, 400, seed=4)
    faces = [_face(0, 40.0, 8.0, 120.0, 140.0), _face(0, 34.0, -15.0, 290.0, 170.0)]
    crops, data = align_faces(image, faces, size=256)
    out = paste_faces(image, crops, data)
    mean_in, max_in, far = _round_trip_errors(image, out, data)
    print(f"synthetic round trip: inside faces mean {mean_in:.3f}/255, max {max_in:.2f}/255")
    assert mean_in < 1.0 and max_in < 8.0
    assert far.numel() > 10000 and far.max() == 0


def test_bigger_restored_crops_are_scaled_back():
    image = _texture(240, 260, seed=5)
    faces = [_face(0, 40.0, 5.0, 130.0, 120.0)]
    crops, data = align_faces(image, faces, size=256)
    bigger = F.interpolate(crops, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    out = paste_faces(image, [bigger[0]], data)  # a list of [C,h,w] crops is accepted too
    mean_in, max_in, far = _round_trip_errors(image, out, data)
    print(f"x2 restored crop round trip: inside mean {mean_in:.3f}/255, max {max_in:.2f}/255")
    assert mean_in < 1.5 and far.max() == 0  # the test's own x2 upsampling blurs a little


def test_upscale_two_matches_bicubic_background():
    image = _texture(160, 200, seed=6)
    crops, data = align_faces(image, [_face(0, 30.0, 0.0, 90.0, 80.0)], size=256)
    out = paste_faces(image, crops, data, upscale=2)
    bicubic = resize_bchw(image, 320, 400, "bicubic")
    up_face = paste_faces(image[:, :, :1, :1].expand(1, 3, 160, 200), crops, data, upscale=2)
    assert out.shape == (1, 3, 320, 400)
    changed = (up_face != resize_bchw(image[:, :, :1, :1].expand(1, 3, 160, 200), 320, 400)).any(1)[0]
    assert torch.equal(out[0][:, ~changed], bicubic[0][:, ~changed])  # exact outside the face
    err = (out - bicubic).abs().amax(1)[0]
    inside = torch.from_numpy(_regions(data, 0, 160, 200)[0].numpy().repeat(2, 0).repeat(2, 1))
    print(f"upscale=2: inside face vs bicubic upscale mean {err[inside].mean() * 255:.3f}/255")
    assert err[inside].mean() * 255 < 1.5
    assert paste_faces(image, crops, data, upscale=1.5).shape == (1, 3, 240, 300)


@pytest.mark.parametrize("border", ["reflect", "constant"])
def test_face_crossing_the_border(border):
    image = _texture(180, 220, seed=7)
    faces = [_face(0, 40.0, 20.0, 15.0, 20.0), _face(0, 36.0, 0.0, 210.0, 100.0)]  # corner, right edge
    crops, data = align_faces(image, faces, size=256, border=border)
    out = paste_faces(image, crops, data)
    err = (out - image).abs().amax(1)[0]
    edge = torch.cat([err[0], err[:, 0], err[:, -1]])  # image rows/columns the faces cross
    print(
        f"border={border}: mean {err.mean() * 255:.3f}/255, on the image edge max {edge.max() * 255:.2f}/255"
    )
    assert torch.isfinite(out).all() and err.mean() * 255 < 0.5
    assert edge.max() * 255 < 8.0  # no dark seam along the image edge, black padding or not


def test_batch_with_zero_one_and_several_faces_later_on_top():
    images = _texture(160, 200, seed=8, batch=2)
    faces = [
        _face(1, 24.0, 0.0, 60.0, 80.0),  # footprint about 98 px wide
        _face(1, 24.0, 0.0, 100.0, 80.0),
        _face(1, 20.0, 0.0, 160.0, 40.0),
    ]
    crops, data = align_faces(images, faces, size=128)
    assert crops.shape == (3, 3, 128, 128) and data.faces_of(0) == [] and data.faces_of(1) == [0, 1, 2]
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).view(3, 3, 1, 1).expand(3, 3, 128, 128)
    out = paste_faces(images, colours, data, feather=0.02)
    assert torch.equal(out[0], images[0])  # the photo without faces is untouched
    torch.testing.assert_close(out[1, :, 80, 80], torch.tensor([0.0, 1.0, 0.0]))  # second face on top
    torch.testing.assert_close(out[1, :, 80, 25], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[1, :, 40, 160], torch.tensor([0.0, 0.0, 1.0]))
    none_crops, none_data = align_faces(images, [], size=128)
    assert none_crops.shape == (0, 3, 128, 128)
    assert torch.equal(paste_faces(images, none_crops, none_data), images)


def test_face_mask_limits_the_pasted_region():
    image = _texture(160, 160, seed=9)
    crops, data = align_faces(image, [_face(0, 40.0, 0.0, 80.0, 80.0)], size=128)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0  # right half of the crop only (any mask resolution)
    out = paste_faces(image, torch.zeros_like(crops), data, face_masks=mask)
    assert torch.equal(out[..., 60:100, 40:70], image[..., 60:100, 40:70])
    assert out[..., 70:90, 90:110].max() == 0


def test_color_correction_pulls_a_shifted_crop_back():
    image = _texture(160, 160, seed=10) * 0.5 + 0.25
    crops, data = align_faces(image, [_face(0, 40.0, 0.0, 80.0, 80.0)], size=128)
    tinted = (crops * torch.tensor([0.6, 1.0, 1.2]).view(1, 3, 1, 1)).clamp(0, 1)
    inside, _ = _regions(data, 0, 160, 160)
    errs = {}
    for method in ("none", "adain", "wavelet"):
        out = paste_faces(image, tinted, data, color_correction=method)
        errs[method] = (out - image).abs()[0][:, inside].mean().item() * 255
    print("colour error inside the face (/255):", {k: round(v, 2) for k, v in errs.items()})
    assert errs["adain"] < 0.5 * errs["none"] and errs["wavelet"] < 0.5 * errs["none"]


def test_bad_inputs_are_clear_errors():
    image = _texture(100, 100, seed=11)
    crops, data = align_faces(image, [_face(0, 30.0, 0.0, 50.0, 50.0)], size=64)
    with pytest.raises(ValueError, match="64x32 but face 0 was aligned as a 64x64"):
        paste_faces(image, crops[..., :32], data)
    with pytest.raises(ValueError, match="got 2 restored crops for 1 aligned faces"):
        paste_faces(image, crops.repeat(2, 1, 1, 1), data)
    with pytest.raises(ValueError, match=r"aligned on images of sizes \[\(100, 100\)\]"):
        paste_faces(image[..., :90], crops, data)
    with pytest.raises(ValueError, match="unknown border"):
        align_faces(image, [], border="wrap")
    with pytest.raises(ValueError, match="outside the batch"):
        align_faces(image, [_face(3, 30.0, 0.0, 50.0, 50.0)])


# --- real photos -----------------------------------------------------------------------------


def _dlib_faces(rgb: np.ndarray) -> list[DetectedFace]:
    dlib = pytest.importorskip("dlib")
    frm = pytest.importorskip("face_recognition_models")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    faces = []
    for r in detector(rgb, 1):
        parts = np.array([[p.x, p.y] for p in predictor(rgb, r).parts()], dtype=np.float64)
        box = np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32)
        faces.append(
            DetectedFace(0, box, dlib_to_retinaface_points(parts[None])[0].astype(np.float32), 1.0, "dlib")
        )
    return faces


@pytest.mark.parametrize("name", ["codeformer_00.jpg", "gfpgan_10045.png", "gpen_Solvay_conference_1927.png"])
def test_real_photo_round_trip(name):
    path = WHOLE / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    from PIL import Image

    rgb = np.array(Image.open(path).convert("RGB"))
    faces = _dlib_faces(rgb)
    assert faces, f"dlib found no face in {name}"
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    crops, data = align_faces(image, faces, size=256)
    out = paste_faces(image, crops, data)
    mean_in, max_in, far = _round_trip_errors(image, out, data)
    scales = [np.hypot(*af.affine[:, 0]) for af in data.faces]
    print(
        f"{name}: {len(faces)} faces, crop/photo scale {min(scales):.2f}-{max(scales):.2f}, "
        f"inside faces mean {mean_in:.3f}/255 max {max_in:.2f}/255, far from faces max {far.max() * 255:.0f}/255"
    )
    assert mean_in < 1.0 and max_in < 12.0
    assert far.max() == 0


def test_rescale_points_maps_pixel_centres_for_numpy_and_torch():
    from priorface.inference.face_align import rescale_points

    pts = np.array([[0.0, 0.0], [3.5, 7.0]])
    # Pixel 0 of a 4-px row covers [-0.5, 0.5]; halved, its centre lands at -0.25 of the 2-px row.
    assert np.allclose(rescale_points(pts, 0.5), [[-0.25, -0.25], [1.5, 3.25]])
    assert np.allclose(rescale_points(pts, 2.0, 1.0), [[0.5, 0.0], [7.5, 7.0]])
    as_torch = rescale_points(torch.from_numpy(pts).float(), 2.0, 1.0)
    assert torch.is_tensor(as_torch) and as_torch.dtype == torch.float32
    assert np.allclose(as_torch.numpy(), rescale_points(pts, 2.0, 1.0))
