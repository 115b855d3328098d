"""Embedded priors on real faces: landmark mask, eye/mouth boxes, template texts, MiniLM, nodes."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from priorface.inference.face_align import template_points
from priorface.inference.images import load_image_file
from priorface.inference.priors.bundle import PriorMismatchError, check_compatible
from priorface.inference.priors.captions import template_caption, template_description
from priorface.inference.priors.embedded import extract_embedded_priors
from priorface.inference.priors.landmark_mask import (
    MASK_LABELS,
    detect_crop_landmarks,
    eye_mouth_boxes,
    landmark_label_map,
    landmark_mask,
)
from priorface.inference.priors.text_encoder import encode_texts, load_text_encoder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FFHQ = SHARED / "data" / "faces" / "dev" / "ffhq"
needs_faces = pytest.mark.skipif(not FFHQ.is_dir(), reason="shared FFHQ dev faces not present")
EYES, NOSE, MOUTH, SKIN = (MASK_LABELS.index(n) for n in ("eyes", "nose", "mouth", "skin"))


def _minilm():
    try:
        return load_text_encoder()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"embedded MiniLM not available: {e}")


@pytest.fixture(scope="module")
def ffhq():
    if not FFHQ.is_dir():
        pytest.skip("shared FFHQ dev faces not present")
    images = torch.stack([load_image_file(p) for p in sorted(FFHQ.glob("*.png"))])
    landmarks, found = detect_crop_landmarks(images)
    return images, landmarks, found


@needs_faces
def test_mask_classes_sit_on_the_landmarks(ffhq):
    images, landmarks, found = ffhq
    assert all(found)
    labels = landmark_label_map(landmarks, 512, 512)
    for lab, lm in zip(labels, landmarks.round().long(), strict=True):
        assert lab[lm[0, 1], lm[0, 0]] == EYES and lab[lm[1, 1], lm[1, 0]] == EYES
        assert lab[lm[2, 1], lm[2, 0]] == NOSE
        mouth = ((lm[3] + lm[4]) / 2).long()
        assert lab[mouth[1], mouth[0]] == MOUTH
        assert lab[0, 0] == 0 and lab[-1, -1] == 0  # corners: background
    one_hot = landmark_mask(landmarks, 512, 512)
    assert one_hot.shape == (10, 5, 512, 512) and torch.equal(one_hot.sum(1), torch.ones(10, 512, 512))


@needs_faces
def test_mask_regions_match_what_the_pixels_show(ffhq):
    """Eyes (iris, lashes) are darker than skin on every face, lips redder than skin on most."""
    images, landmarks, _ = ffhq
    # At 128 px: the regions are still many pixels, and the test runs 16x faster.
    images = torch.nn.functional.interpolate(images, size=(128, 128), mode="area")
    landmarks = (landmarks + 0.5) / 4 - 0.5
    labels = landmark_label_map(landmarks, 128, 128)
    darker, redder = 0, 0
    for x, lab in zip(images, labels, strict=True):
        luma = x.mean(0)
        darker += float(luma[lab == EYES].mean()) < float(luma[lab == SKIN].mean()) - 0.02
        red_green = [float(x[0][lab == k].mean() / x[1][lab == k].mean()) for k in (MOUTH, SKIN)]
        redder += red_green[0] > red_green[1]
    assert darker == 10
    assert redder >= 7  # open smiles (teeth) and beards make lips less red than skin on a few
    # Control: the same test with the mask shifted by a quarter of the crop finds no eyes.
    shifted = landmark_label_map(landmarks + torch.tensor([0.0, 32.0]), 128, 128)
    assert (
        sum(
            float(x.mean(0)[s == EYES].mean()) < float(x.mean(0)[lab == SKIN].mean()) - 0.02
            for x, s, lab in zip(images, shifted, labels, strict=True)
        )
        < 6
    )


def test_eye_mouth_boxes_gfpgan_like_proportions():
    lm = torch.tensor(template_points("ffhq", 512), dtype=torch.float32)
    boxes = eye_mouth_boxes(lm, 512)
    iod = float(lm[1, 0] - lm[0, 0])
    mouth_width = float((lm[4] - lm[3]).norm())
    assert boxes.shape == (1, 3, 4)
    left = boxes[0, 0]
    assert torch.allclose((left[:2] + left[2:]) / 2, lm[0], atol=1e-3)
    assert math.isclose(float(left[2] - left[0]), 0.5 * iod, rel_tol=1e-4)
    mouth = boxes[0, 2]
    assert torch.allclose((mouth[:2] + mouth[2:]) / 2, (lm[3] + lm[4]) / 2, atol=1e-3)
    assert math.isclose(float(mouth[2] - mouth[0]), 1.24 * mouth_width, rel_tol=1e-4)
    # Near the border the boxes are clipped to the crop.
    edge = eye_mouth_boxes(lm - torch.tensor([190.0, 0.0]), 512)
    assert float(edge[0, 0, 0]) == 0.0 and float(edge[0, 0, 2]) > 0.0


def test_batched_drawing_matches_a_per_pixel_reference():
    """The batched ellipse test (axes divided by semi-axes) agrees pixel for pixel with a plain
    projection of each pixel onto the axes, also for faces partly outside the crop."""
    from priorface.inference.priors import landmark_mask as lm_module

    gen = torch.Generator().manual_seed(0)
    lm = torch.tensor(template_points("ffhq", 160), dtype=torch.float32).repeat(4, 1, 1)
    lm = lm + torch.randn(4, 5, 2, generator=gen) * 6
    lm[3] -= torch.tensor([100.0, 0.0])  # partly outside the crop
    b, h, w = 4, 160, 130
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    grid = torch.stack([xs, ys], -1)

    def reference_fill(labels, value, centre, axis_a, semi_a, axis_b, semi_b):
        rel = grid[None] - centre[:, None, None]
        a = (rel * axis_a[:, None, None]).sum(-1) / semi_a[:, None, None]
        c = (rel * axis_b[:, None, None]).sum(-1) / semi_b[:, None, None]
        labels[a * a + c * c <= 1.0] = value

    fast = landmark_label_map(lm, h, w)
    original = lm_module._fill_ellipse
    try:
        lm_module._fill_ellipse = reference_fill
        reference = landmark_label_map(lm, h, w)
    finally:
        lm_module._fill_ellipse = original
    assert torch.equal(fast, reference) and fast.shape == (b, h, w)
    assert set(torch.unique(fast).tolist()) == {0, 1, 2, 3, 4}


def test_each_face_is_drawn_as_if_it_were_alone():
    """One batched test over all faces: a face's mask must not depend on the faces beside it."""
    gen = torch.Generator().manual_seed(1)
    lm = torch.tensor(template_points("utkface", 128), dtype=torch.float32).repeat(6, 1, 1)
    lm = lm + torch.randn(6, 5, 2, generator=gen) * 8
    batch = landmark_label_map(lm, 128, 96)
    alone = torch.cat([landmark_label_map(lm[i : i + 1], 128, 96) for i in range(6)])
    assert torch.equal(batch, alone) and batch.dtype == torch.uint8
    assert landmark_mask(lm, 128, 96).device == lm.device  # drawn where the landmarks live


def test_landmark_input_is_checked():
    with pytest.raises(ValueError, match=r"\[B,5,2\]"):
        landmark_mask(torch.zeros(2, 4, 2), 64, 64)


def test_template_captions():
    assert template_caption(None) == "a photo of a face"
    assert template_caption({"age": 34, "gender": "female", "race": "white"}) == (
        "a photo of the face of a 34-year-old white woman"
    )
    assert template_caption({"age": 8, "gender": "male", "race": "asian"}) == (
        "a photo of the face of an 8-year-old Asian boy"
    )
    assert template_caption({"age": 18, "gender": "male", "race": "other"}) == (
        "a photo of the face of an 18-year-old man"
    )


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre = points.mean(0)
    return (points - centre) @ rot.T + centre


def test_template_description_reads_the_pose():
    front = template_points("ffhq", 512)
    tilted = _rotate(front, 15.0)  # clockwise in the picture: the picture-right eye is lower
    turned = front.copy()
    turned[2, 0] -= 0.3 * (front[1, 0] - front[0, 0])  # nose tip well left of the eye midpoint
    wide = front.copy()
    wide[3, 0] -= 20
    wide[4, 0] += 20
    lm = torch.tensor(np.stack([front, tilted, turned, wide]), dtype=torch.float32)
    texts = template_description(lm, [{"age": 34, "gender": "female", "race": "white"}, None, None, None])
    assert (
        texts[0]
        == "A photo of the face of a 34-year-old white woman, seen from the front, with a relaxed mouth."
    )
    assert "head tilted towards the right" in texts[1] and "seen from the front" in texts[1]
    assert "turned clearly towards the left of the picture" in texts[2]
    assert "wide mouth" in texts[3]
    assert "mouth" not in template_description(lm[:1], [None], mouth_observed=False)[0]


@pytest.mark.slow  # importing sentence-transformers takes seconds
def test_minilm_matches_sentence_transformers():
    encoder = _minilm()
    st = pytest.importorskip("sentence_transformers")
    texts = [
        "a photo of the face of a 34-year-old white woman",
        "a smiling old man with a grey beard",
        "hello",
    ]
    ours = encode_texts(encoder, texts)
    reference = st.SentenceTransformer(str(encoder.folder), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    assert ours.pooled.shape == (3, 384) and ours.tokens.shape[:2] == ours.attention_mask.shape
    assert torch.allclose(ours.pooled, reference.cpu(), atol=1e-5)
    assert (
        encoder.max_length == 256
        and encoder.extractor_id == "text-encoder:sentence-transformers/all-MiniLM-L6-v2"
    )


def test_minilm_similar_captions_are_closer():
    encoder = _minilm()
    texts = [
        "a photo of the face of a smiling young woman",
        "a portrait of a happy young woman smiling",
        "a red sports car parked on a wet street",
    ]
    pooled = encode_texts(encoder, texts).pooled
    sim = pooled @ pooled.T
    assert torch.allclose(sim.diagonal(), torch.ones(3), atol=1e-5)  # L2-normalised
    assert float(sim[0, 1]) > float(sim[0, 2]) + 0.3


def test_minilm_truncates_long_texts_with_a_warning(caplog):
    encoder = _minilm()
    with caplog.at_level(logging.WARNING):
        emb = encode_texts(encoder, ["face " * 400, "short"])
    assert "truncated" in caplog.text
    assert emb.tokens.shape[1] == 256 and int(emb.attention_mask[1].sum()) == 3  # [CLS] short [SEP]
    assert float(emb.tokens[1, 3:].abs().max()) == 0.0  # padding positions are zeroed


@needs_faces
def test_embedded_bundle_and_mismatch_refusal(ffhq):
    _minilm()
    images, _, _ = ffhq
    labels = [{"age": 30, "gender": "male", "race": "black"}, None]
    bundle = extract_embedded_priors(images[:2], labels=labels, captions=None, descriptions="a calm face")
    assert bundle.caption == ["a photo of the face of a 30-year-old black man", "a photo of a face"]
    assert bundle.description == ["a calm face", "a calm face"]
    assert bundle.sources["description"]["extractor"] == "user-text"
    assert bundle.mask.shape == (2, 5, 512, 512) and bundle.mask_labels == MASK_LABELS
    assert bundle.caption_embedding.pooled.shape == (2, 384)
    trained = {
        "mask": {"extractor": "sam-face-parts-v1"},
        "caption_embedding": dict(bundle.sources["caption_embedding"]),
    }
    with pytest.raises(PriorMismatchError, match="landmark-mask-v1"):
        check_compatible(trained, bundle, "LLV-FSR")
    del trained["mask"]
    assert check_compatible(trained, bundle) == ["caption_embedding"]


def _nodes_module():
    import importlib

    return importlib.import_module("priorface.nodes.prior_nodes")


@needs_faces
def test_nodes(comfy_env, check_outputs, ffhq, tmp_path):
    _minilm()
    m = _nodes_module()
    faces = ffhq[0][:2].permute(0, 2, 3, 1).contiguous()
    node = m.EmbeddedPriorsNode()
    priors, summary = check_outputs(
        m.EmbeddedPriorsNode,
        node.extract(
            faces,
            True,
            True,
            True,
            True,
            "",
            "first face\nsecond face",
            m.EMBEDDED_TEXT_ENCODER,
            "ffhq",
            True,
            str(tmp_path),
        ),
    )
    assert priors.description == ["first face", "second face"] and priors.caption == ["a photo of a face"] * 2
    assert "landmark-mask-v1" in summary and "text-encoder:sentence-transformers/all-MiniLM-L6-v2" in summary
    summary2, overlay, depth = check_outputs(
        m.InspectPriorsNode, m.InspectPriorsNode().inspect(priors, faces)
    )
    assert overlay.shape == faces.shape and depth.shape == faces.shape
    assert torch.allclose(depth, torch.full_like(depth, 0.5))  # no depth: grey placeholder
    assert float((overlay - faces).abs().max()) > 0.2  # class colours drawn
    (typed,) = check_outputs(
        m.PriorsFromTextNode,
        m.PriorsFromTextNode().encode("an old man", "", m.EMBEDDED_TEXT_ENCODER, 1, priors),
    )
    assert typed.caption == ["an old man"] * 2 and typed.mask is priors.mask
    assert not torch.equal(typed.caption_embedding.pooled, priors.caption_embedding.pooled)
    (merged,) = check_outputs(m.MergePriorsNode, m.MergePriorsNode().merge(typed, priors))
    assert (
        merged.caption == priors.caption and merged.sources["caption"]["extractor"] == "template-caption-v1"
    )
    with pytest.raises(ValueError, match="both caption and description are empty"):
        m.PriorsFromTextNode().encode("  ", "", m.EMBEDDED_TEXT_ENCODER, 1)
    with pytest.raises(ValueError, match="nothing to compute"):
        node.extract(faces, False, False, False, True, "", "", m.EMBEDDED_TEXT_ENCODER, "ffhq", False)


def test_node_contract_of_prior_nodes(comfy_env):
    m = _nodes_module()
    for cls in m.NODES:
        assert cls.NODE_ID.startswith("PriorFace") and cls.CATEGORY.startswith("PriorFace/")
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (_kind, opts) in spec.get(section, {}).items():
                assert opts.get("tooltip"), f"{cls.NODE_ID}.{name} has no tooltip"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
