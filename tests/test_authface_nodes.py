"""AuthFace nodes: loader over the model folders (tiny diffusers SDXL + ControlNet file), restore nodes, errors."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

PHOTO = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "whole" / "codeformer_00.jpg"
)
FAST = dict(
    steps=2,
    scheduler="ddim",
    guidance=1.0,
    control_strength=1.0,
    seed=3,
    start="noise",
    denoise=1.0,
    color_correction="wavelet",
    vae_tile=0,
)


@pytest.fixture
def authface_nodes(comfy_env):
    """Our node module (not registered in priorface.nodes yet) with a tiny SDXL and ControlNet installed."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    folder = tiny_sd.save_tiny_diffusers_folder(comfy_env.models_dir / "diffusers" / "tiny-sdxl", "sdxl")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    controlnet = ControlNetModel.from_unet(unet)
    target = comfy_env.models_dir / "controlnet" / "authface_controlnet.safetensors"
    target.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(target))
    return importlib.import_module("priorface.nodes.authface_nodes")


def _load(module, check_outputs):
    cls = module.AuthFaceLoaderNode
    spec = cls.INPUT_TYPES()["required"]
    assert "tiny-sdxl" in spec["model_name"][0] and "authface_controlnet.safetensors" in spec["weights"][0]
    return check_outputs(cls, cls().load("tiny-sdxl", "authface_controlnet.safetensors", "auto"))[0]


def test_loader_and_restore_faces_node(authface_nodes, check_outputs):
    authface = _load(authface_nodes, check_outputs)
    assert authface.controlnet is not None and authface.dtype == torch.float32
    cls = authface_nodes.AuthFaceRestoreFacesNode
    torch.manual_seed(0)
    faces = torch.rand(2, 24, 24, 3)
    (out,) = check_outputs(cls, cls().restore(authface, faces, size=32, **FAST))
    assert out.shape == (2, 32, 32, 3)
    (again,) = cls().restore(authface, faces, size=32, **FAST)
    assert torch.equal(out, again)
    (other,) = cls().restore(authface, faces, size=32, **{**FAST, "seed": 4})
    assert (other - out).abs().mean() > 1e-3
    (same_size,) = cls().restore(authface, faces, size=0, prompt="a face", **FAST)
    assert same_size.shape == faces.shape


def test_missing_files_name_every_folder_and_what_is_expected(authface_nodes, comfy_env):
    cls = authface_nodes.AuthFaceLoaderNode
    with pytest.raises(FileNotFoundError) as err:
        cls().load("authface_stage1.safetensors", "authface_controlnet.safetensors", "auto")
    text = str(err.value)
    assert "authface_stage1.safetensors" in text and "stage I SDXL" in text
    for sub in ("checkpoints", "diffusers", "priorface/authface"):
        assert str(comfy_env.models_dir / sub) in text
    with pytest.raises(FileNotFoundError, match="ControlNet") as err:
        cls().load("tiny-sdxl", "missing.safetensors", "auto")
    assert str(comfy_env.models_dir / "controlnet") in str(err.value)


def test_empty_folders_give_placeholders(comfy_env):
    module = importlib.import_module("priorface.nodes.authface_nodes")
    spec = module.AuthFaceLoaderNode.INPUT_TYPES()["required"]
    assert spec["model_name"][0][0].startswith("(no SDXL") and spec["weights"][0][0].startswith(
        "(no ControlNet"
    )


@pytest.mark.slow
@pytest.mark.skipif(not PHOTO.is_file(), reason="shared whole photos not present")
def test_restore_photo_node(authface_nodes, check_outputs):
    from priorface.inference.images import load_image_file

    authface = _load(authface_nodes, check_outputs)
    cls = authface_nodes.AuthFaceRestorePhotoNode
    photo = load_image_file(PHOTO).unsqueeze(0).permute(0, 2, 3, 1)
    image, report = check_outputs(
        cls, cls().restore(authface, photo, "dlib (embedded, no download)", size=64, upscale=1.0, **FAST)
    )
    assert image.shape == photo.shape and "restored at 64 px" in report
    assert (image - photo).abs().amax() > 0.05  # the face was replaced
    blank = torch.full((1, 40, 50, 3), 0.5)
    image, report = cls().restore(
        authface, blank, "dlib (embedded, no download)", size=64, upscale=2.0, **FAST
    )
    assert report == "no face found" and image.shape == (1, 80, 100, 3)
