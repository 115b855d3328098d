"""Face detection: RetinaFace architecture and file loading, dlib point conversion, the three backends."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from priorface.inference import face_detection as fd
from priorface.models.checkpoint import KeyMismatchError, match_state_dict, read_checkpoint
from priorface.models.retinaface import RetinaFace, backbone_of, decode, prior_boxes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models" / "facedetection"
FACES = SHARED / "data" / "faces"
RETINA = MODELS / "mobilenet0.25_Final.pth"
YUNET = MODELS / "yunet_s_640_640.onnx"
CLEAR_FACE = FACES / "dev" / "ffhq" / "00004.png"  # adult, frontal: the backends agree best
GROUP = FACES / "whole" / "gpen_Solvay_conference_1927.png"


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"shared test files missing: {missing}")


def _load(path: Path) -> torch.Tensor:
    from PIL import Image

    rgb = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def _configs():
    return {
        "dlib": {"backend": "dlib"},
        "retinaface": {"backend": "retinaface", "model_path": RETINA},
        "yunet": {"backend": "yunet", "model_path": YUNET},
    }


# --- architecture and weights ------------------------------------------------------------------


def test_prior_boxes_layout():
    priors = prior_boxes(32, 32, ((16, 32), (64, 128), (256, 512)))
    # 4x4 cells at stride 8, 2x2 at 16, 1x1 at 32; two anchors per cell.
    assert priors.shape == (2 * (16 + 4 + 1), 4)
    assert priors[0].tolist() == [4.0, 4.0, 16.0, 16.0] and priors[1].tolist() == [4.0, 4.0, 32.0, 32.0]
    assert priors[2].tolist() == [12.0, 4.0, 16.0, 16.0]  # x varies fastest, like the head's reshape
    assert priors[-1].tolist() == [16.0, 16.0, 512.0, 512.0]
    assert prior_boxes(33, 17, ((10, 20), (32, 64), (128, 256))).shape[0] == 2 * (5 * 3 + 3 * 2 + 2 * 1)


def test_decode_of_zero_deltas_is_the_anchor():
    priors = torch.tensor([[50.0, 60.0, 20.0, 40.0]])
    boxes, points = decode(torch.zeros(1, 4), torch.zeros(1, 10), priors)
    assert boxes.tolist() == [[40.0, 40.0, 60.0, 80.0]]
    assert torch.equal(points, torch.tensor([[50.0, 60.0]]).expand(1, 5, 2))
    boxes, _ = decode(torch.tensor([[1.0, 0.0, 0.0, 5.0]]), torch.zeros(1, 10), priors)
    # centre moves by 0.1 * width; height grows by exp(0.2 * 5)
    assert torch.allclose(boxes[0, [0, 2]], torch.tensor([42.0, 62.0]))
    assert math.isclose(float(boxes[0, 3] - boxes[0, 1]), 40.0 * math.e, rel_tol=1e-5)


def test_network_output_shapes_match_priors():
    torch.manual_seed(0)
    net = RetinaFace().eval()
    with torch.no_grad():
        loc, prob, ldm = net(torch.randn(2, 3, 70, 45))
    n = prior_boxes(70, 45, net.min_sizes).shape[0]
    assert loc.shape == (2, n, 4) and prob.shape == (2, n) and ldm.shape == (2, n, 10)
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0


def test_real_retinaface_file_loads_with_every_key():
    _need(RETINA)
    state = read_checkpoint(RETINA).content
    assert backbone_of(state) == "mobilenet0.25"
    report = match_state_dict(RetinaFace("mobilenet0.25"), state)
    assert report.ok, report.describe()
    net = fd.load_retinaface(RETINA)
    assert net.variant == "face_detector_1mb"  # recognised by its fingerprint


def test_module_prefix_is_stripped_and_weights_arrive(tmp_path):
    torch.manual_seed(0)
    net = RetinaFace().eval()
    path = tmp_path / "dataparallel.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    loaded = fd.load_retinaface(path)
    assert loaded.variant == "pytorch_retinaface"
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(net(x), loaded(x), strict=True):
        assert torch.allclose(a, b)


def test_wrong_key_is_reported_by_name(tmp_path):
    state = RetinaFace().state_dict()
    state["fpn.merge9.0.weight"] = state.pop("fpn.merge1.0.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(KeyMismatchError) as err:
        fd.load_retinaface(path)
    assert "fpn.merge1.0.weight" in str(err.value) and "fpn.merge9.0.weight" in str(err.value)


def test_resnet50_layout_is_recognised():
    keys = RetinaFace("resnet50").state_dict()
    assert backbone_of(keys) == "resnet50"
    assert "body.layer4.2.conv3.weight" in keys and keys["fpn.output3.0.weight"].shape == (256, 2048, 1, 1)
    with pytest.raises(ValueError, match="not a RetinaFace checkpoint"):
        backbone_of({"encoder.weight": torch.zeros(1)})


# --- dlib point conversion -----------------------------------------------------------------------


def _dlib_face(angle: float, shift: tuple[float, float]) -> np.ndarray:
    # Upright face, eyes 100 px apart: dlib order = right-eye outer/inner, left-eye outer/inner, nose base.
    pts = np.array([[90.0, 0.0], [20.0, 0.0], [-90.0, 0.0], [-20.0, 0.0], [5.0, 80.0]])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + np.array(shift)


def test_dlib_conversion_eye_centres_and_rotation_equivariance():
    upright = fd.dlib_to_retinaface_points(_dlib_face(0.0, (0.0, 0.0))[None])[0]
    assert np.allclose(upright[0], [-55.0, 0.0]) and np.allclose(upright[1], [55.0, 0.0])
    # nose below the eyes, mouth below the nose, mouth corners either side of the nose
    assert (
        upright[2, 1] > 0 and upright[3, 1] > upright[2, 1] and upright[3, 0] < upright[2, 0] < upright[4, 0]
    )
    angle, shift = 0.4, (300.0, -20.0)
    turned = fd.dlib_to_retinaface_points(_dlib_face(angle, shift)[None])[0]
    c, s = math.cos(angle), math.sin(angle)
    expected = upright @ np.array([[c, s], [-s, c]]) + np.array(shift)
    assert np.allclose(turned, expected, atol=1e-3)


# --- backends on real photos ---------------------------------------------------------------------


def test_each_backend_finds_the_clear_face_and_they_agree():
    _need(RETINA, YUNET, CLEAR_FACE)
    image = _load(CLEAR_FACE)
    found = {name: fd.detect_faces(image, **cfg) for name, cfg in _configs().items()}
    for name, faces in found.items():
        assert len(faces) == 1, (name, [f.box for f in faces])
        face = faces[0]
        assert face.backend == name and face.image_index == 0
        x1, y1, x2, y2 = face.box
        assert (face.landmarks[:, 0] > x1).all() and (face.landmarks[:, 0] < x2).all()
        assert (face.landmarks[:, 1] > y1).all() and (face.landmarks[:, 1] < y2).all()
        assert face.landmarks[0, 0] < face.landmarks[1, 0]  # image-left eye first
    # Every pair of backends agrees; eyes are observed by all, nose and mouth are dlib estimates.
    names = list(found)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            fa, fb = found[a][0], found[b][0]
            err = np.linalg.norm(fa.landmarks - fb.landmarks, axis=1) / fa.size
            assert err[:2].max() < 0.12 and err.max() < 0.2, (a, b, err)


def test_group_photo_and_options():
    _need(RETINA, YUNET, GROUP)
    image = _load(GROUP)
    for name, cfg in _configs().items():
        faces = fd.detect_faces(image, **cfg)
        assert len(faces) >= 25, (name, len(faces))  # 29 people sit for the 1927 photograph
    faces = fd.detect_faces(image, "yunet", YUNET, max_faces=3, sort="largest")
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert len(faces) == 3 and areas == sorted(areas, reverse=True)
    xs = [f.box[0] for f in fd.detect_faces(image, "yunet", YUNET, sort="left_to_right")]
    assert xs == sorted(xs)
    sides = sorted(
        max(f.box[2] - f.box[0], f.box[3] - f.box[1]) for f in fd.detect_faces(image, "yunet", YUNET)
    )
    limit = sides[len(sides) // 2]
    big = fd.detect_faces(image, "yunet", YUNET, min_face_size=limit)
    assert len(big) == sum(s >= limit for s in sides) and 0 < len(big) < len(sides)


def test_coordinates_follow_the_image_scale():
    _need(RETINA, YUNET, CLEAR_FACE)
    image = _load(CLEAR_FACE)
    half = torch.nn.functional.interpolate(image, scale_factor=0.5, mode="area")
    for name, cfg in _configs().items():
        full, small = fd.detect_faces(image, **cfg)[0], fd.detect_faces(half, **cfg)[0]
        err = np.linalg.norm(full.landmarks[:2] - (small.landmarks[:2] * 2 + 0.5), axis=1) / full.size
        assert err.max() < 0.1, (name, err)


def test_batches_and_empty_images():
    _need(RETINA, YUNET, CLEAR_FACE)
    face = _load(CLEAR_FACE)
    batch = torch.cat([torch.zeros_like(face), face, face.flip(-1)])
    for name, cfg in _configs().items():
        assert fd.detect_faces(torch.zeros(1, 3, 96, 128), **cfg) == [], name
        faces = fd.detect_faces(batch, **cfg)
        assert [f.image_index for f in faces] == [1, 2], name
        # the mirrored image's face is the mirror of the original one
        mirrored = faces[1].landmarks[[1, 0], 0]
        assert np.allclose(
            face.shape[-1] - 1 - mirrored, faces[0].landmarks[:2, 0], atol=0.15 * faces[0].size
        )


def test_aligned_faces_are_found():
    paths = sorted((FACES / "dev" / "ffhq").glob("*.png"))
    _need(RETINA, *(paths or [FACES / "dev" / "ffhq"]))
    images = torch.cat([_load(p) for p in paths])
    faces = fd.detect_faces(images, "retinaface", RETINA, max_faces=1)
    assert sorted(f.image_index for f in faces) == list(range(len(paths)))


def test_bad_arguments_and_cache(tmp_path):
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown face detection backend"):
        fd.detect_faces(image, "mtcnn")
    with pytest.raises(ValueError, match="needs a model file"):
        fd.detect_faces(image, "retinaface")
    with pytest.raises(FileNotFoundError):
        fd.detect_faces(image, "yunet", tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="sort"):
        fd.detect_faces(image, sort="random")
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        fd.detect_faces(torch.zeros(1, 32, 32, 3))
    assert fd.get_backend("dlib") is fd.get_backend("dlib")
