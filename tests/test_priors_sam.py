"""SAM mask prior: config inference from shapes, loading, prompted and automatic masks, nodes.

No real SAM weights are stored here: a tiny random SAM (128 px input, width 32, 2 blocks) is saved
in the official key layout and loaded through the user-facing loader. Random weights give
meaningless masks, so these tests check structure, geometry and equivalence with
segment_anything's own predictor, not segmentation quality.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from priorface.inference.face_align import template_points
from priorface.inference.images import load_image_file
from priorface.inference.priors import sam_mask
from priorface.inference.priors.bundle import PriorBundle
from priorface.inference.priors.sam_loading import (
    SamConfig,
    build_sam,
    infer_sam_config,
    load_sam,
    sam_from_state_dict,
)
from priorface.models.checkpoint import CorruptCheckpointError, KeyMismatchError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FFHQ_FACE = SHARED / "data" / "faces" / "dev" / "ffhq" / "00000.png"
REAL_SAM_B = SHARED / "models" / "sams" / "sam_vit_b_01ec64.pth"

TINY = SamConfig(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=128,
    patch_size=16,
    window_size=4,
    mlp_ratio=2.0,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_depth=1,
    decoder_mlp_dim=32,
    iou_head_depth=2,
    iou_head_hidden_dim=16,
)
SIZE = 256  # crops are resized to this side to keep the tests fast


def _tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_sam(TINY)
    # Random init leaves LayerNorms at 1/0 and relative position tables at 0: perturb everything so
    # that a wrongly loaded tensor changes the outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "sams" / "sam_tiny.pth"
    path.parent.mkdir(parents=True)
    torch.save(_tiny_state(), path)
    return path


@pytest.fixture(scope="module")
def face() -> tuple[torch.Tensor, np.ndarray]:
    """A real FFHQ-aligned face (or a synthetic one) at SIZE px, with its template landmarks."""
    if FFHQ_FACE.is_file():
        image = load_image_file(FFHQ_FACE)[None]
        image = torch.nn.functional.interpolate(image, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    else:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
        skin = ((xx / 0.55) ** 2 + ((yy - 0.1) / 0.75) ** 2 <= 1).float()
        image = torch.stack([0.2 + 0.6 * skin, 0.2 + 0.45 * skin, 0.3 + 0.3 * skin])[None]
    return image.clamp(0, 1), template_points("ffhq", SIZE)[None].astype(np.float32)


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_official_configs_are_recognised_from_shapes(variant):
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # shapes only: no memory, no time
        official = sam_model_registry[variant]().state_dict()
        config = infer_sam_config(official)
        ours = build_sam(config).state_dict()
    expected_global = {"vit_b": (2, 5, 8, 11), "vit_l": (5, 11, 17, 23), "vit_h": (7, 15, 23, 31)}
    assert config.variant == variant
    assert config.encoder_global_attn_indexes == expected_global[variant]
    assert (config.image_size, config.window_size, config.prompt_embed_dim) == (1024, 14, 256)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_tiny_checkpoint_round_trip_and_cache(tiny_file, tmp_path):
    sam = load_sam(tiny_file)
    assert sam.config == TINY and sam.variant == "custom"
    assert sam.extractor_id == "sam:custom:sam_tiny"
    assert load_sam(tiny_file) is sam  # cached
    reference = build_sam(TINY)
    reference.load_state_dict(torch.load(tiny_file, weights_only=True))
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sam.model.image_encoder(x), reference.image_encoder(x), rtol=0, atol=0)
    # Replacing the file (new weights) loads it again.
    other = tmp_path / "sam_tiny.pth"
    torch.save(_tiny_state(seed=1), other)
    with torch.no_grad():
        assert not torch.equal(load_sam(other).model.image_encoder(x), sam.model.image_encoder(x))


def test_a_windowed_block_is_told_from_a_global_one():
    config = infer_sam_config(_tiny_state())
    assert config.encoder_global_attn_indexes == (1,) and config.window_size == 4


def test_missing_key_is_named():
    state = _tiny_state()
    del state["mask_decoder.iou_prediction_head.layers.1.bias"]
    with pytest.raises(KeyMismatchError, match=r"iou_prediction_head\.layers\.1\.bias"):
        sam_from_state_dict(state)
    state = _tiny_state()
    del state["image_encoder.pos_embed"]  # needed to infer the image size
    with pytest.raises(KeyMismatchError, match=r"image_encoder\.pos_embed"):
        sam_from_state_dict(state)
    state = _tiny_state()
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError, match=r"unexpected.*mask_decoder\.extra\.weight"):
        sam_from_state_dict(state)


def test_malformed_checkpoints_get_clear_errors(tmp_path, tiny_file):
    garbage = tmp_path / "broken.pth"
    data = tiny_file.read_bytes()
    garbage.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(CorruptCheckpointError, match="broken.pth"):
        load_sam(garbage)
    other = tmp_path / "other_model.pth"
    torch.save({"body.0.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="not a segment-anything checkpoint"):
        load_sam(other)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="not a SAM state dict"):
        load_sam(listed)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_sam(tmp_path / "missing.pth")


@pytest.mark.skipif(not REAL_SAM_B.is_file(), reason="real SAM ViT-B weights not present")
def test_real_vit_b_file_is_recognised():
    assert load_sam(REAL_SAM_B).variant == "vit_b"


# --- geometry ------------------------------------------------------------------------------------


def test_prompts_and_zones_follow_the_landmarks():
    lm = template_points("ffhq", 512)
    prompts = {p.name: p for p in sam_mask.part_prompts(lm, 512, 512)}
    assert set(prompts) == set(sam_mask.PART_CLASS)
    np.testing.assert_allclose(prompts["left_eye"].points[0], lm[0], atol=1e-4)
    np.testing.assert_allclose(prompts["nose"].points[0], lm[2], atol=1e-4)
    for p in prompts.values():  # every positive point lies in its own box
        if p.box is not None:
            for xy in p.points[p.labels == 1]:
                assert p.box[0] <= xy[0] <= p.box[2] and p.box[1] <= xy[1] <= p.box[3], p.name
    eye_y = lm[:2, 1].mean()
    brow_y = prompts["left_brow"].points[0, 1]
    hair_y = prompts["hair"].points[prompts["hair"].labels == 1, 1]
    assert (hair_y < brow_y).all() and brow_y < eye_y - 20
    face_negatives = prompts["face"].points[prompts["face"].labels == 0]
    np.testing.assert_allclose(face_negatives[:2], lm[:2], atol=1e-4)

    zones = sam_mask.part_zones(lm, 512, 512)

    def at(name, xy):
        return bool(zones[name][int(round(xy[1])), int(round(xy[0]))])

    assert at("left_eye", lm[0]) and not at("left_eye", lm[1]) and at("right_eye", lm[1])
    assert at("nose", lm[2]) and not at("nose", lm[0])
    assert at("mouth", lm[3:].mean(0)) and not at("mouth", lm[2])
    assert all(at("face", p) for p in lm)
    assert not zones["hair"][int(lm[3:, 1].max()) + 1 :].any()  # nothing below the mouth
    assert not (zones["hair"] & zones["face"]).any()
    hair = prompts["hair"]
    assert all(at("hair", xy) for xy in hair.points[hair.labels == 1])
    assert not any(at("hair", xy) for xy in hair.points[hair.labels == 0])
    for name in ("left_eye", "left_brow", "nose", "mouth"):  # generous, yet much smaller than the face
        assert 0.03 < zones[name].sum() / zones["face"].sum() < 0.2, name


def test_rotated_face_rotates_the_frame():
    lm = template_points("ffhq", 512)
    centre = lm[:2].mean(0)
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    rotated = (lm - centre) @ rot.T + centre
    a = {p.name: p.points for p in sam_mask.part_prompts(lm, 512, 512)}
    b = {p.name: p.points for p in sam_mask.part_prompts(rotated, 512, 512)}
    expected = (a["left_brow"] - centre) @ rot.T + centre
    np.testing.assert_allclose(b["left_brow"], expected, atol=1e-3)


def test_label_priority():
    h = w = 8
    full = torch.ones(h, w, dtype=torch.bool)
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, :4] = True
    top = torch.zeros(h, w, dtype=torch.bool)
    top[:2] = True
    corner = torch.zeros(h, w, dtype=torch.bool)
    corner[0, 0] = True
    labels = sam_mask.compose_labels({"hair": full, "skin": left, "nose": top, "eyes": corner}, h, w)
    idx = sam_mask.MASK_LABELS.index
    assert labels[0, 0] == idx("eyes")  # eyes beat nose, skin and hair
    assert labels[0, 1] == idx("nose") and labels[0, 6] == idx("nose")  # nose beats skin and hair
    assert labels[5, 1] == idx("skin") and labels[5, 6] == idx("hair")
    assert sam_mask.compose_labels({}, h, w).eq(0).all()
    one_hot = sam_mask.one_hot_labels(labels[None])
    assert one_hot.shape == (1, 7, h, w) and one_hot.sum(1).eq(1).all()
    with pytest.raises(ValueError, match="unknown mask classes"):
        sam_mask.compose_labels({"ears": full}, h, w)


def test_plausible_selection_skips_a_mask_that_fills_the_image():
    zone = torch.zeros(16, 16, dtype=torch.bool)
    zone[4:8, 4:8] = True
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0] = True  # whole image: best score, implausible for an eye
    masks[1, 5:7, 5:7] = True  # inside the zone
    masks[2, 12:, 12:] = True  # outside the zone
    scores = torch.tensor([0.9, 0.5, 0.8])
    assert sam_mask._choose(masks, scores, zone, "left_eye", "plausible") == 1
    assert sam_mask._choose(masks, scores, zone, "left_eye", "score") == 0
    masks[1] = False  # nothing plausible: fall back to the best score
    assert sam_mask._choose(masks, scores, zone, "left_eye", "plausible") == 0


def test_automatic_masks_go_to_the_part_whose_zone_holds_them():
    lm = template_points("ffhq", 512)
    zones = sam_mask.part_zones(lm, 512, 512)
    instances = torch.zeros(512, 512, dtype=torch.int64)
    instances[zones["face"]] = 1  # the whole face -> skin
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    pupil = (xx - lm[0, 0]) ** 2 + (yy - lm[0, 1]) ** 2 <= 8**2
    instances[pupil] = 2  # a small disk at the left eye -> eyes, although the face zone holds it too
    instances[:30, :30] = 3  # image corner -> background
    instances[zones["hair"] & (yy < 150)] = 4  # above the forehead -> hair
    classes = sam_mask.instance_classes(instances, lm)
    assert classes == {1: "skin", 2: "eyes", 4: "hair"}
    labels = sam_mask.instances_to_labels(instances, lm)
    idx = sam_mask.MASK_LABELS.index
    assert labels[int(lm[0, 1]), int(lm[0, 0])] == idx("eyes")
    assert labels[int(lm[2, 1]), int(lm[2, 0])] == idx("skin")
    assert labels[5, 5] == idx("background")


# --- SAM runs ------------------------------------------------------------------------------------


def test_batched_prompts_match_segment_anything_predictor(tiny_file, face):
    from segment_anything import SamPredictor

    image, lm = face
    sam = load_sam(tiny_file)
    predictor = SamPredictor(sam.model)
    predictor.set_image(sam_mask._to_uint8_hwc(image[0]))
    prompts = sam_mask.part_prompts(lm[0], SIZE, SIZE)
    ours = sam_mask.predict_part_masks(predictor, prompts, SIZE, SIZE)
    for p in prompts:  # one prompt at a time through SAM's own numpy API
        masks, scores, _ = predictor.predict(p.points, p.labels, p.box, multimask_output=True)
        assert torch.equal(ours[p.name][0], torch.from_numpy(masks)), p.name
        torch.testing.assert_close(ours[p.name][1], torch.from_numpy(scores), rtol=1e-5, atol=1e-6)


def test_prompted_mode_gives_a_valid_deterministic_one_hot_mask(tiny_file, face):
    image, lm = face
    sam = load_sam(tiny_file)
    batch = torch.cat([image, image.flip(-1)])
    points = np.concatenate([lm, lm])
    points[1, :, 0] = SIZE - 1 - points[1, :, 0]
    points[1] = points[1][[1, 0, 2, 4, 3]]  # mirrored: image-left/right swap
    first = sam_mask.sam_face_masks(sam, batch, points)
    second = sam_mask.sam_face_masks(sam, batch, torch.from_numpy(points))
    assert first.one_hot.shape == (2, 7, SIZE, SIZE) and first.one_hot.dtype == torch.float32
    assert set(first.one_hot.unique().tolist()) <= {0.0, 1.0}
    assert first.one_hot.sum(1).eq(1).all()
    assert torch.equal(first.one_hot, second.one_hot) and first.instances is None
    assert first.settings == {
        "mode": "prompted",
        "labels": list(sam_mask.MASK_LABELS),
        "landmarks": "given",
        "selection": "plausible",
    }
    # Eyes, brows, nose and mouth stay inside their zones whatever the (random) network says.
    zones = sam_mask.part_zones(lm[0], SIZE, SIZE)
    eyes = first.one_hot[0, sam_mask.MASK_LABELS.index("eyes")].bool()
    assert not (eyes & ~(zones["left_eye"] | zones["right_eye"])).any()
    bundle = sam_mask.with_sam_mask(None, sam, first)
    assert bundle.batch_size == 2 and bundle.mask_labels == sam_mask.MASK_LABELS
    assert bundle.sources["mask"]["extractor"] == "sam:custom:sam_tiny"
    with pytest.raises(ValueError, match=r"landmarks must be \[2,5,2\]"):
        sam_mask.sam_face_masks(sam, batch, lm)
    with pytest.raises(ValueError, match="mode must be one of"):
        sam_mask.sam_face_masks(sam, image, lm, mode="semantic")


def test_automatic_mode_gives_an_instance_map_and_labels(tiny_file, face):
    image, lm = face
    sam = load_sam(tiny_file)
    kw = dict(mode="automatic", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    result = sam_mask.sam_face_masks(sam, image, lm, **kw)
    again = sam_mask.sam_face_masks(sam, image, lm, **kw)
    inst = result.instances
    assert inst.shape == (1, 1, SIZE, SIZE) and inst.dtype == torch.int64
    assert int(inst.max()) >= 1 and torch.equal(inst, again.instances)
    assert result.one_hot.shape == (1, 7, SIZE, SIZE) and result.one_hot.sum(1).eq(1).all()
    expected = sam_mask.instances_to_labels(inst[0, 0], lm[0])
    assert torch.equal(result.one_hot[0].argmax(0), expected)
    assert result.settings["points_per_side"] == 4 and result.settings["mode"] == "automatic"


def test_automatic_instances_are_numbered_by_area(tiny_file, monkeypatch):
    from segment_anything import SamAutomaticMaskGenerator

    def masks(*boxes):
        out = []
        for y0, y1, x0, x1 in boxes:
            m = np.zeros((16, 16), bool)
            m[y0:y1, x0:x1] = True
            out.append({"segmentation": m, "area": int(m.sum())})
        return out

    records = masks((0, 4, 0, 4), (0, 16, 0, 16), (8, 16, 8, 16))  # areas 16, 256, 64
    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", lambda self, image: records)
    inst = sam_mask.automatic_instances(load_sam(tiny_file), torch.zeros(3, 16, 16), points_per_side=2)
    assert inst[15, 0] == 1  # the largest, visible where nothing smaller covers it
    assert inst[15, 15] == 2 and inst[0, 0] == 3  # smaller masks painted on top


def test_landmarks_are_found_with_dlib_or_taken_from_the_template(tiny_file, face):
    pytest.importorskip("dlib")
    sam = load_sam(tiny_file)
    grey = torch.full((1, 3, 128, 128), 0.5)
    points, missing = sam_mask.face_landmarks(grey, "ffhq")
    assert missing == [True]
    np.testing.assert_allclose(points[0], template_points("ffhq", 128), atol=1e-4)
    if not FFHQ_FACE.is_file():
        pytest.skip("real FFHQ face not present")
    image, lm = face
    result = sam_mask.sam_face_masks(sam, image)
    assert result.settings["landmarks"] == "dlib"
    iod = float(np.linalg.norm(lm[0, 1] - lm[0, 0]))
    assert np.abs(result.landmarks[0, :2] - lm[0, :2]).max() < 0.25 * iod  # eyes near the template's


# --- nodes ---------------------------------------------------------------------------------------


def test_nodes_load_segment_and_keep_input_priors(comfy_env, check_outputs, tiny_file, face):
    nodes = importlib.import_module("priorface.nodes.sam_nodes")
    assert nodes.SAMLoaderNode.INPUT_TYPES()["required"]["sam_name"][0] == [nodes.NO_FILE]
    sams = comfy_env.models_dir / "sams"
    sams.mkdir(parents=True)
    os.symlink(tiny_file, sams / "sam_tiny.pth")
    assert nodes.SAMLoaderNode.INPUT_TYPES()["required"]["sam_name"][0] == ["sam_tiny.pth"]
    for cls in nodes.NODES:
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            assert all(opts.get("tooltip") for _, opts in section.values()), cls.__name__
        assert cls.NODE_ID.startswith("PriorFace") and cls.CATEGORY.startswith("PriorFace/")
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)

    (sam,) = nodes.SAMLoaderNode().load("sam_tiny.pth")
    assert sam.variant == "custom"
    image, lm = face
    comfy_image = image.permute(0, 2, 3, 1).contiguous()
    priors = PriorBundle(batch_size=1, caption=["a face"]).with_prior(
        "landmarks", torch.from_numpy(lm), {"extractor": "template"}
    )
    args = dict(
        mode="prompted",
        selection="plausible",
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        template="ffhq",
    )
    out = check_outputs(
        nodes.SAMFaceMaskNode, nodes.SAMFaceMaskNode().segment(comfy_image, sam, **args, priors=priors)
    )
    bundle, region, overlay = out
    assert bundle.caption == ["a face"] and bundle.mask.shape == (1, 7, SIZE, SIZE)
    assert bundle.sources["mask"]["settings"]["landmarks"] == "given"
    assert bundle.sources["landmarks"] == {"extractor": "template"}
    expected_region = 1 - bundle.mask[:, [0, 6]].sum(1)  # everything but background and hair
    assert torch.equal(region, expected_region) and overlay.shape == comfy_image.shape
    tinted = bundle.mask[0, 0] == 0
    assert torch.equal(overlay[0][~tinted], comfy_image[0][~tinted])  # background untouched
    if tinted.any():
        assert not torch.equal(overlay[0][tinted], comfy_image[0][tinted])
    auto = nodes.SAMFaceMaskNode().segment(comfy_image, sam, **{**args, "mode": "automatic"}, priors=priors)
    assert auto[0].sources["mask"]["settings"]["mode"] == "automatic"
    with pytest.raises(ValueError, match="priors hold 2 face"):
        nodes.SAMFaceMaskNode().segment(comfy_image, sam, **args, priors=PriorBundle(batch_size=2))
