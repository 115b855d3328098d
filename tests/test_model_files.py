"""Model folder lookup: headless models dir, extra_model_paths.yaml, ComfyUI registration, errors."""

from __future__ import annotations

import pytest

from priorface.inference.model_files import (
    MODELS_DIR_ENV,
    ModelFileNotFoundError,
    headless_locator,
    parse_extra_model_paths,
)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"0")
    return path


def test_headless_lookup_from_environment(tmp_path, monkeypatch):
    f = _touch(tmp_path / "models" / "facedetection" / "yunet.onnx")
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
    loc = headless_locator()
    assert loc.list("facedetection") == ["yunet.onnx"]
    assert loc.resolve("facedetection", "yunet.onnx") == f


def test_missing_file_error_lists_searched_folders(tmp_path):
    loc = headless_locator(tmp_path / "models")
    with pytest.raises(ModelFileNotFoundError) as err:
        loc.resolve("sams", "sam_vit_b_01ec64.pth")
    message = str(err.value)
    assert "sam_vit_b_01ec64.pth" in message and str(tmp_path / "models" / "sams") in message
    assert "models/sams/" in message and "does not exist" in message


def test_folder_models_are_listed_as_folders(tmp_path):
    root = tmp_path / "models"
    _touch(root / "LLM" / "blip2-opt-2.7b" / "config.json")
    _touch(root / "LLM" / "blip2-opt-2.7b" / "model.safetensors")
    _touch(root / "LLM" / "group" / "llava-1.5-7b" / "config.json")
    assert headless_locator(root).list("LLM") == ["blip2-opt-2.7b", "group/llava-1.5-7b"]


def test_extra_model_paths_yaml(tmp_path):
    _touch(tmp_path / "shared" / "my_sams" / "sam_vit_l.pth")
    _touch(tmp_path / "abs" / "clip_l.safetensors")
    yaml_file = tmp_path / "cfg" / "extra_model_paths.yaml"
    yaml_file.parent.mkdir()
    yaml_file.write_text(
        f"mine:\n  base_path: ../shared\n  sams: my_sams\n  clip: |\n    {tmp_path / 'abs'}\n    other\n"
        "loose:\n  sams: relative_sams\n"
    )
    parsed = parse_extra_model_paths(yaml_file)
    assert parsed["sams"][0] == (tmp_path / "shared" / "my_sams").resolve()
    assert parsed["text_encoders"][0] == tmp_path / "abs"  # legacy key 'clip' maps like ComfyUI
    assert parsed["text_encoders"][1] == (tmp_path / "shared" / "other").resolve()
    assert parsed["sams"][1] == (yaml_file.parent / "relative_sams").resolve()  # no base_path: YAML's folder
    loc = headless_locator(None, yaml_file)
    assert loc.list("sams") == ["sam_vit_l.pth"] and loc.list("text_encoders") == ["clip_l.safetensors"]


def test_bad_names_are_rejected(tmp_path):
    loc = headless_locator(tmp_path)
    with pytest.raises(ValueError, match="no model selected"):
        loc.resolve("sams", "  ")
    with pytest.raises(ValueError, match="inside the model folders"):
        loc.resolve("sams", "../../etc/passwd")
    with pytest.raises(ValueError, match="unknown model folder kind"):
        loc.list("nope")


def test_comfy_registration_adds_without_overwriting(comfy_env):
    fp = comfy_env.folder_paths
    # A key another pack (or extra_model_paths.yaml) created before us, with its own folder.
    fp.folder_names_and_paths["sams"] = (["/elsewhere/sams"], {".pth"})
    comfy_env.nodes.comfy_bridge.register_model_folders()
    paths, exts = fp.folder_names_and_paths["sams"]
    assert paths[0] == "/elsewhere/sams" and paths[1].endswith("sams")
    assert ".pth" in exts and ".safetensors" in exts
    # A key we create gets our extensions, not ComfyUI's "list every file" empty set.
    assert fp.folder_names_and_paths["priorface_llvfsr"][1] == {".safetensors"}
    assert fp.folder_names_and_paths["checkpoints"][0] == [str(comfy_env.models_dir / "checkpoints")]
    assert fp.folder_names_and_paths["diffusers"][1] == ["folder"]  # ComfyUI keeps a list here


def test_comfy_locator_uses_folder_paths(comfy_env):
    f = _touch(comfy_env.models_dir / "priorface" / "vspbfr" / "code_diffuser.pt")
    loc = comfy_env.nodes.comfy_bridge.LOCATOR
    assert loc.list("priorface_vspbfr") == ["code_diffuser.pt"]
    assert loc.resolve("priorface_vspbfr", "code_diffuser.pt") == f
