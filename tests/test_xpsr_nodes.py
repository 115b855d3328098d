"""XPSR nodes: contract, clear errors for missing files, loader -> prompts -> upscale, faces, workflows."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import tiny_sd  # noqa: E402

from priorface.inference.model_files import ModelFileNotFoundError  # noqa: E402
from priorface.inference.priors.bundle import PriorBundle  # noqa: E402
from priorface.inference.xpsr_loading import base_choices, xpsr_checkpoint_names, xpsr_choices  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

ROOT = Path(__file__).resolve().parents[1]
WHOLE = ROOT.parent / "shared" / "data" / "faces" / "whole"
WORKFLOWS = ("xpsr_upscale.json", "xpsr_face_restore.json")
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False}


@pytest.fixture
def xn(comfy_env, monkeypatch):
    """The XPSR node module, registered in the fake ComfyUI's mappings for this test only."""
    from priorface.nodes import xpsr_nodes

    for cls in xpsr_nodes.NODES:
        monkeypatch.setitem(comfy_env.nodes.NODE_CLASS_MAPPINGS, cls.NODE_ID, cls)
        monkeypatch.setitem(comfy_env.nodes.NODE_DISPLAY_NAME_MAPPINGS, cls.NODE_ID, cls.DISPLAY_NAME)
    return xpsr_nodes


def _save_xpsr_folder(root: Path, sd_unet) -> Path:
    from priorface.models.xpsr_controlnet import xpsr_controlnet_class
    from priorface.models.xpsr_unet import xpsr_unet_from_sd

    torch.manual_seed(1)
    xpsr_unet_from_sd(sd_unet).save_pretrained(root / "unet")
    xpsr_controlnet_class().from_unet(sd_unet).save_pretrained(root / "controlnet")
    return root


@pytest.fixture
def small(xn, monkeypatch):
    """Sample at the requested size: the official 512-px minimum makes tiny-model tests slow."""
    settings = xn._settings
    monkeypatch.setattr(xn, "_settings", lambda *a, **kw: replace(settings(*a, **kw), process_size=0))


@pytest.fixture
def fake_sd(monkeypatch, tmp_path):
    """Stand-ins for inference/sd_checkpoints.py and sd_prompts.py (written elsewhere) over tiny SD parts."""
    encoder, tokenizer = tiny_sd.tiny_text_encoders("sd15")[0], tiny_sd.tiny_tokenizer(tmp_path / "tok")
    parts = SimpleNamespace(
        family="sd15",
        unet=tiny_sd.tiny_unet("sd15"),
        vae=tiny_sd.tiny_vae(),
        text_encoders=[encoder],
        tokenizers=[tokenizer],
        scheduler_config=SCHEDULER,
        source="",
    )
    calls = []

    def load_sd_parts(source, family=None, tokenizer_dirs=None, dtype=torch.float32, config_root=None):
        calls.append((Path(source), dtype))
        return parts

    def encode_prompts(p, prompts):
        ids = p.tokenizers[0](
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        return SimpleNamespace(embeds=p.text_encoders[0](ids.input_ids).last_hidden_state, pooled=None)

    for name, fn in (("sd_checkpoints", load_sd_parts), ("sd_prompts", encode_prompts)):
        module = types.ModuleType(f"priorface.inference.{name}")
        setattr(module, fn.__name__, fn)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return SimpleNamespace(parts=parts, calls=calls)


def test_node_contract(xn, comfy_env):
    import test_node_contract as contract

    for check in (
        contract.test_registry_is_not_empty_and_names_are_prefixed,
        contract.test_input_specs_are_well_formed,
        contract.test_return_types_and_names_agree,
        contract.test_function_matches_inputs,
    ):
        check(comfy_env)


def test_missing_files_are_clear_errors(xn, comfy_env):
    models = comfy_env.models_dir
    loader = xn.XPSRLoaderNode()
    spec = loader.INPUT_TYPES()["required"]
    with pytest.raises(ModelFileNotFoundError) as err:
        loader.load(spec["model_name"][0][0], spec["weights"][0][0], "auto")
    assert str(models / "checkpoints") in str(err.value) and str(models / "diffusers") in str(err.value)
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "v1-5.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFileNotFoundError, match="priorface/xpsr|priorface_xpsr") as err:
        loader.load("v1-5.safetensors", xpsr_choices(comfy_env.nodes.comfy_bridge.LOCATOR)[0], "auto")
    assert str(models / "priorface" / "xpsr") in str(err.value)
    half = models / "priorface" / "xpsr" / "checkpoint-5" / "unet"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert xpsr_choices(comfy_env.nodes.comfy_bridge.LOCATOR) == ["checkpoint-5"]
    with pytest.raises(FileNotFoundError, match="controlnet/config.json"):
        loader.load("v1-5.safetensors", "checkpoint-5", "auto")


def test_checkpoint_folders_are_named_by_their_parent():
    listed = ["a/checkpoint-1/unet", "a/checkpoint-1/controlnet", "b/controlnet", "other", "unet"]
    assert xpsr_checkpoint_names(listed) == [".", "a/checkpoint-1", "b"]


def test_prompts_node_uses_priors_and_typed_overrides(xn, check_outputs):
    node = xn.XPSRPromptsNode
    bundle = PriorBundle(batch_size=2, prompt_high=["a red car", "a dog"], prompt_low=["blurry", "noisy"])
    prompts, summary = check_outputs(node, node().build("", "", "clean", "bad", "sharp", bundle))
    assert prompts.for_image(1, 2) == ("a dog clean", "noisy") and prompts.low_negative == "sharp"
    assert "[1] high: a dog clean" in summary
    prompts, _ = node().build("", "dark and soft", "clean", "bad", "sharp", bundle)
    assert prompts.high == ("a red car", "a dog") and prompts.low == ("dark and soft",)
    prompts, _ = node().build("a face", "", "", "bad", "sharp", None)
    assert prompts.for_image(0, 5) == ("a face", "")


def test_loader_prompts_and_upscale(xn, comfy_env, fake_sd, small, check_outputs):
    models = comfy_env.models_dir
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    _save_xpsr_folder(models / "priorface" / "xpsr" / "checkpoint-300000", fake_sd.parts.unet)
    loader = xn.XPSRLoaderNode
    spec = loader.INPUT_TYPES()["required"]
    assert spec["weights"][0] == ["checkpoint-300000"]
    assert spec["model_name"][0] == ["v1-5-pruned-emaonly.safetensors"]
    (pipe,) = check_outputs(
        loader, loader().load("v1-5-pruned-emaonly.safetensors", "checkpoint-300000", "fp16")
    )
    assert fake_sd.calls == [(models / "checkpoints" / "v1-5-pruned-emaonly.safetensors", torch.float32)]
    assert pipe.unet.dtype == torch.float32  # fp16 asked for on CPU: fp32
    assert hasattr(pipe.unet.up_blocks[1], "pixel_attentions")
    (prompts, _) = xn.XPSRPromptsNode().build("a cat", "blurry", "clean", "bad", "sharp")
    image = torch.rand(1, 12, 10, 3, generator=torch.Generator().manual_seed(0))
    node = xn.XPSRUpscaleNode()
    args = dict(preset="custom", steps=2, guidance=3.0, seed=1, start="lr", color_fix="adain", upscale=4.0)
    (a,) = check_outputs(xn.XPSRUpscaleNode, node.upscale(pipe, image, prompts, **args, tile_size=0))
    assert a.shape == (1, 48, 40, 3)
    (b,) = node.upscale(pipe, image, prompts, **args, tile_size=0)
    assert torch.equal(a, b)


@pytest.mark.skipif(not WHOLE.is_dir(), reason="shared face photos not present")
def test_restore_faces_node_on_a_photo(xn, small, check_outputs):
    from PIL import Image

    from priorface.inference.xpsr_sampler import XPSRPipeline

    sd_unet = tiny_sd.tiny_unet("sd15")
    encoder = tiny_sd.tiny_text_encoders("sd15")[0]
    from priorface.models.xpsr_controlnet import xpsr_controlnet_class
    from priorface.models.xpsr_unet import xpsr_unet_from_sd

    def encode(texts):  # any fixed embedding per text count: the faces need no tokenizer here
        return encoder(torch.full((len(texts), 8), 5)).last_hidden_state

    pipe = XPSRPipeline(
        xpsr_unet_from_sd(sd_unet),
        xpsr_controlnet_class().from_unet(sd_unet),
        tiny_sd.tiny_vae(),
        SCHEDULER,
        encode,
    )
    arr = np.asarray(Image.open(WHOLE / "codeformer_04.jpg").convert("RGB"), dtype=np.float32) / 255.0
    image = torch.from_numpy(arr)[None]
    (prompts, _) = xn.XPSRPromptsNode().build("a face", "", "clean", "bad", "sharp")
    node = xn.XPSRRestoreFacesNode()
    sampler = dict(preset="custom", steps=1, guidance=1.0, seed=0, start="noise", color_fix="adain")
    out, report = check_outputs(
        type(node),
        node.restore(pipe, image, prompts, xn.EMBEDDED_DETECTOR, 128, 1.0, 1.0, "wavelet", **sampler),
    )
    assert out.shape == image.shape and report.startswith("face 0") and "32-px crop to 128 px" in report
    assert float((out - image).abs().max()) > 0.1  # the face region was replaced


def test_workflows_match_the_nodes_and_their_api_twins(xn, comfy_env):
    import importlib.util

    import test_workflows

    spec = importlib.util.spec_from_file_location("ui_to_api", ROOT / "scripts" / "ui_to_api.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    for name in WORKFLOWS:
        path = ROOT / "workflows" / name
        test_workflows.test_workflow_matches_node_definitions(comfy_env, path)
        ui = json.loads(path.read_text())
        api = converter.ui_to_api(ui, comfy_env.nodes.NODE_CLASS_MAPPINGS)
        assert json.loads((ROOT / "workflows" / "api" / name).read_text()) == api, f"regenerate api/{name}"
        note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "models/priorface/xpsr" in note and "models/checkpoints" in note


def test_real_sd_loader_if_present(xn, comfy_env, small, check_outputs):
    pytest.importorskip("priorface.inference.sd_checkpoints")
    pytest.importorskip("priorface.inference.sd_prompts")
    models = comfy_env.models_dir
    tiny_sd.save_tiny_diffusers_folder(models / "diffusers" / "tiny-sd15", "sd15")
    _save_xpsr_folder(models / "priorface" / "xpsr" / "run" / "checkpoint-1", tiny_sd.tiny_unet("sd15"))
    assert "diffusers/tiny-sd15" in base_choices(comfy_env.nodes.comfy_bridge.LOCATOR) and xpsr_choices(
        comfy_env.nodes.comfy_bridge.LOCATOR
    ) == ["run/checkpoint-1"]
    (pipe,) = check_outputs(
        xn.XPSRLoaderNode, xn.XPSRLoaderNode().load("diffusers/tiny-sd15", "run/checkpoint-1", "auto")
    )
    (prompts, _) = xn.XPSRPromptsNode().build("a cat", "blurry", "clean", "bad", "sharp")
    args = dict(preset="custom", steps=1, guidance=2.0, seed=1, start="lr", color_fix="none", upscale=4.0)
    (out,) = xn.XPSRUpscaleNode().upscale(pipe, torch.rand(1, 8, 8, 3), prompts, **args, tile_size=0)
    assert out.shape == (1, 32, 32, 3)
