"""VSPBFR nodes: file dropdowns and errors, loading official and converted files, outputs, cancel."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import test_node_contract as contract
import torch
from tiny_vspbfr import tiny_models, write_official_files

from priorface.inference.vspbfr_pipeline import restore_faces

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


@pytest.fixture(scope="module")
def bundle():
    return tiny_models()


@pytest.fixture
def vn(comfy_env):
    # Not registered in priorface.nodes yet: import the module itself.
    return importlib.import_module("priorface.nodes.vspbfr_nodes")


@pytest.fixture
def folder(comfy_env, bundle):
    return write_official_files(bundle, comfy_env.models_dir / "priorface" / "vspbfr")


def _faces(n=2):
    return torch.rand(n, 32, 32, 3, generator=torch.Generator().manual_seed(0))


def test_nodes_obey_the_node_contract(comfy_env, vn):
    mappings = {cls.NODE_ID: cls for cls in vn.NODES}
    fake = SimpleNamespace(
        nodes=SimpleNamespace(
            NODE_CLASS_MAPPINGS=mappings,
            NODE_DISPLAY_NAME_MAPPINGS={k: c.DISPLAY_NAME for k, c in mappings.items()},
        )
    )
    contract.test_registry_is_not_empty_and_names_are_prefixed(fake)
    contract.test_input_specs_are_well_formed(fake)
    contract.test_return_types_and_names_agree(fake)
    contract.test_function_matches_inputs(fake)


def test_loader_without_files_names_file_folders_and_content(comfy_env, vn):
    spec = vn.VSPBFRLoaderNode.INPUT_TYPES()["required"]
    assert spec["style_codec"][0] == ["style_encoder_decoder.pt"]  # the expected name, as a hint
    with pytest.raises(FileNotFoundError) as err:
        vn.VSPBFRLoaderNode().load("style_encoder_decoder.pt", "code_diffuser.pt", "restoration_net.pt")
    text = str(err.value)
    assert "style_encoder_decoder.pt" in text and str(comfy_env.models_dir / "priorface" / "vspbfr") in text
    assert "e4e style encoder" in text and "huggingface.co/Wanglong2/VSPBFR" in text


def test_load_restore_trajectory_and_photo(comfy_env, vn, folder, bundle, check_outputs):
    (comfy_env.models_dir / "priorface" / "vspbfr" / "other.safetensors").write_bytes(b"")
    spec = vn.VSPBFRLoaderNode.INPUT_TYPES()["required"]
    assert spec["code_diffuser"][0][0] == "code_diffuser.pt" and spec["code_diffuser"][1]["default"] == (
        "code_diffuser.pt"
    )
    assert "other.safetensors" in spec["restoration_net"][0]
    (models,) = vn.VSPBFRLoaderNode().load(
        "style_encoder_decoder.pt", "code_diffuser.pt", "restoration_net.pt"
    )
    faces = _faces()
    (out,) = check_outputs(
        vn.VSPBFRRestoreFacesNode, vn.VSPBFRRestoreFacesNode().restore(models, faces, 11, 4)
    )
    want = restore_faces(bundle, faces.permute(0, 3, 1, 2), 11, 4).faces.permute(0, 2, 3, 1)
    assert out.shape == (2, 32, 32, 3) and torch.equal(out, want)
    traj, again = check_outputs(
        vn.VSPBFRTrajectoryNode, vn.VSPBFRTrajectoryNode().trajectory(models, faces, 11, 2)
    )
    assert traj.shape == (2 * 3, 32, 32, 3) and again.shape == (2, 32, 32, 3)
    node = vn.VSPBFRRestorePhotoNode
    image, report = check_outputs(
        node,
        node().restore(
            models, torch.full((1, 40, 48, 3), 0.4), vn.EMBEDDED_DETECTOR, 0, 4, 2.0, 1.0, "wavelet"
        ),
    )
    assert image.shape == (1, 80, 96, 3) and report == "no face found"
    assert comfy_env.updates  # progress went to ComfyUI


def test_convert_then_load_safetensors(comfy_env, vn, folder, bundle):
    node = vn.VSPBFRConvertNode
    assert node.INPUT_TYPES()["required"]["checkpoint"][0] == sorted(p.name for p in folder.values())
    for path in folder.values():
        text = node().convert(path.name, False)["result"][0]
        assert text.startswith("wrote") and path.with_suffix(".safetensors").is_file()
    assert "exists already" in node().convert("code_diffuser.pt", False)["result"][0]
    (models,) = vn.VSPBFRLoaderNode().load(
        "style_encoder_decoder.safetensors", "code_diffuser.safetensors", "restoration_net.safetensors"
    )
    faces = _faces(1).permute(0, 3, 1, 2)
    assert torch.equal(restore_faces(models, faces, 3).faces, restore_faces(bundle, faces, 3).faces)


def test_interrupt_stops_the_node(comfy_env, vn, folder):
    (models,) = vn.VSPBFRLoaderNode().load(
        "style_encoder_decoder.pt", "code_diffuser.pt", "restoration_net.pt"
    )
    comfy_env.model_management.interrupt_current_processing()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        vn.VSPBFRRestoreFacesNode().restore(models, _faces(), 0, 4)
