"""SD1.5/SDXL checkpoints: shipped configs, single-file export/import, diffusers folders, prompts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_sd
import torch

from priorface.inference import sd_checkpoints as sc
from priorface.inference import sd_components as comp
from priorface.inference import sd_keymap as km
from priorface.inference.sd_prompts import encode_prompts, sdxl_time_ids
from priorface.models.checkpoint import CorruptCheckpointError, KeyMismatchError

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

FAMILIES = ("sd15", "sdxl")
# Published parameter counts (runwayml SD1.5, SDXL base 1.0): UNet, VAE, text encoders.
KNOWN_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.fixture(scope="module")
def config_root(tmp_path_factory):
    return tiny_sd.write_tiny_configs(tmp_path_factory.mktemp("tiny_configs"))


def _meta_layout(family):
    """Real-size configs built on meta: component models and the single-file tensors they export to."""
    configs = comp.read_component_configs(comp.config_dir(None, family), family)
    models, full = {}, {}
    for name, kind in comp.COMPONENTS[family].items():
        models[name] = comp.build_meta(kind, configs[name])
        canon = comp.canonical_state(kind, models[name])
        full.update(km.to_single_file(km.component_ops(kind, family, canon), canon))
    return configs, models, full


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _unet_out(parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = parts.unet.config
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    extra = None
    if parts.family == "sdxl":
        pooled = torch.randn(2, parts.text_encoders[1].config.projection_dim, generator=g)
        extra = {"text_embeds": pooled, "time_ids": sdxl_time_ids((64, 64), (0, 0), (64, 64), 2)}
    with torch.no_grad():
        return parts.unet(x, torch.tensor([10, 500]), ctx, added_cond_kwargs=extra).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_configs_have_published_parameter_counts(family):
    _, models, full = _meta_layout(family)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts == KNOWN_COUNTS[family]
    assert sc.detect_family(full) == family
    # Key names every real checkpoint of the family has (diffusers uses them to recognise files).
    probe = {
        "sd15": "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "sdxl": "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
    }[family]
    assert probe in full


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_layout_matches_diffusers_converters(family):
    from diffusers.loaders import single_file_utils as sfu

    configs, models, full = _meta_layout(family)
    checks = {
        "unet": sfu.convert_ldm_unet_checkpoint(full, configs["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(full, configs["vae"]),
    }
    for name, converted in checks.items():
        ref = models[name].state_dict()
        assert converted.keys() == ref.keys(), name
        assert all(converted[k].shape == ref[k].shape for k in ref), name
    clip = sfu.convert_ldm_clip_checkpoint(full)
    assert set(clip) == set(comp.canonical_state("clip", models["text_encoder"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(family, tmp_path, config_root):
    parts = tiny_sd.tiny_sd_parts(family, tmp_path / "tok")
    path = sc.export_single_file(parts, tmp_path / "m.safetensors")
    loaded = sc.load_sd_parts(path, config_root=config_root)
    assert loaded.family == family and loaded.source == str(path)
    for a, b in zip(
        [parts.unet, parts.vae, *parts.text_encoders],
        [loaded.unet, loaded.vae, *loaded.text_encoders],
        strict=True,
    ):
        _assert_same_weights(a, b)
    assert torch.equal(_unet_out(parts), _unet_out(loaded))
    assert loaded.tokenizers == [None] * len(parts.text_encoders)
    # The file says its family, and a file PriorFace wrote rebuilds itself without config_root.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()[sc.FAMILY_KEY] == family
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    text = {
        "sd15": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "sdxl": "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    }[family]
    assert text in keys
    _assert_same_weights(parts.unet, sc.load_sd_parts(path).unet)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_what_diffusers_converters_read(family, tmp_path):
    """Independent check of the key map: diffusers' own single-file converters read our file back."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    parts = tiny_sd.tiny_sd_parts(family, tmp_path / "tok")
    state = load_file(str(sc.export_single_file(parts, tmp_path / "m.safetensors")))
    pairs = [
        (sfu.convert_ldm_unet_checkpoint(state, dict(parts.unet.config)), parts.unet.state_dict()),
        (sfu.convert_ldm_vae_checkpoint(state, dict(parts.vae.config)), parts.vae.state_dict()),
        (sfu.convert_ldm_clip_checkpoint(state), comp.canonical_state("clip", parts.text_encoders[0])),
    ]
    if family == "sdxl":
        enc2 = parts.text_encoders[1]
        converted = sfu.convert_open_clip_checkpoint(enc2, state, prefix="conditioner.embedders.1.model.")
        pairs.append((converted, comp.canonical_state("clip_proj", enc2)))
    for converted, ref in pairs:
        assert set(converted) == set(ref)
        for k in ref:
            assert torch.equal(converted[k].reshape(ref[k].shape), ref[k]), k


def test_export_dtype_and_atomic_overwrite(tmp_path, config_root):
    parts = tiny_sd.tiny_sd_parts("sd15", tmp_path / "tok")
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    sc.export_single_file(parts, path, dtype=torch.float16)
    loaded = sc.load_sd_parts(path, config_root=config_root, dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    ref = parts.unet.state_dict()
    assert all(torch.equal(v, ref[k].half()) for k, v in loaded.unet.state_dict().items())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_loads_and_exports(family, tmp_path, config_root):
    folder = tiny_sd.save_tiny_diffusers_folder(tmp_path / "pipe", family, seed=3)
    parts = sc.load_sd_parts(folder)
    assert parts.family == family and all(t is not None for t in parts.tokenizers)
    _assert_same_weights(parts.unet, tiny_sd.tiny_unet(family, 3))
    _assert_same_weights(parts.vae, tiny_sd.tiny_vae(13))
    for a, b in zip(parts.text_encoders, tiny_sd.tiny_text_encoders(family, 23), strict=True):
        _assert_same_weights(a, b)
    cfg = parts.scheduler_config
    assert (cfg["num_train_timesteps"], cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]) == (
        1000,
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert cfg["prediction_type"] == "epsilon"
    again = sc.load_sd_parts(
        sc.export_single_file(parts, tmp_path / "m.safetensors"), config_root=config_root
    )
    assert torch.equal(_unet_out(parts), _unet_out(again))
    with pytest.raises(ValueError, match="family"):
        sc.load_sd_parts(folder, family="sdxl" if family == "sd15" else "sd15")


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompts_matches_diffusers_pipeline(family, tmp_path):
    import diffusers

    parts = tiny_sd.tiny_sd_parts(family, tmp_path / "tok")
    prompts = ["a photo of a smiling face", ""]
    scheduler = diffusers.DDPMScheduler.from_config(parts.scheduler_config)
    common = dict(
        vae=parts.vae,
        unet=parts.unet,
        scheduler=scheduler,
        text_encoder=parts.text_encoders[0],
        tokenizer=parts.tokenizers[0],
    )
    with torch.no_grad():
        out = encode_prompts(parts, prompts)
        if family == "sd15":
            pipe = diffusers.StableDiffusionPipeline(
                **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
            ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            assert out.pooled is None
        else:
            pipe = diffusers.StableDiffusionXLPipeline(
                **common, text_encoder_2=parts.text_encoders[1], tokenizer_2=parts.tokenizers[1]
            )
            ref, _, ref_pooled, _ = pipe.encode_prompt(
                prompts, device="cpu", do_classifier_free_guidance=False
            )
            torch.testing.assert_close(out.pooled, ref_pooled, rtol=0, atol=0)
    assert out.embeds.shape == (2, 77, parts.unet.config.cross_attention_dim)
    torch.testing.assert_close(out.embeds, ref, rtol=0, atol=0)
    assert not out.embeds.requires_grad


def test_single_file_tokenizers_come_from_the_caller(tmp_path, config_root):
    parts = tiny_sd.tiny_sd_parts("sdxl", tmp_path / "tok")
    path = sc.export_single_file(parts, tmp_path / "m.safetensors")
    bare = sc.load_sd_parts(path, config_root=config_root)
    with pytest.raises(ValueError, match="tokenizer_dirs"):
        encode_prompts(bare, ["a face"])
    shared = tiny_sd.write_tiny_tokenizer(tmp_path / "shared_tok")
    loaded = sc.load_sd_parts(path, config_root=config_root, tokenizer_dirs=shared)
    # One shared folder: encoder 2 pads with "!" (id 0 in the real vocab) like SDXL's tokenizer_2 and ComfyUI's clip-G.
    tok1, tok2 = loaded.tokenizers
    assert tok1.pad_token == "<|endoftext|>" and tok2.pad_token == "!"
    assert tok2("a", padding="max_length", max_length=77)["input_ids"][-1] == tok2.convert_tokens_to_ids("!")
    out = encode_prompts(loaded, [""])
    assert out.embeds.shape == (1, 77, 40) and out.pooled.shape == (1, 24)
    with pytest.raises(ValueError, match="2 text encoder"):
        sc.load_sd_parts(path, config_root=config_root, tokenizer_dirs=[shared] * 3)
    with pytest.raises(ValueError, match="list of strings"):
        encode_prompts(loaded, "a face")


def test_sdxl_time_ids():
    ids = sdxl_time_ids((1024, 768), (16, 8), (512, 512), 3, dtype=torch.float16)
    assert ids.shape == (3, 6) and ids.dtype == torch.float16
    assert ids[2].tolist() == [1024, 768, 16, 8, 512, 512]
    with pytest.raises(ValueError, match="crop_top_left"):
        sdxl_time_ids((1024, 1024), (0,), (1024, 1024), 1)
    with pytest.raises(ValueError, match="batch"):
        sdxl_time_ids((1024, 1024), (0, 0), (1024, 1024), 0)


def test_detect_family_variants():
    assert sc.detect_family({"_class_name": "StableDiffusionXLPipeline"}) == "sdxl"
    assert sc.detect_family({"_class_name": "StableDiffusionPipeline"}) == "sd15"
    assert sc.detect_family(tiny_sd.tiny_unet("sdxl").config) == "sdxl"
    assert sc.detect_family(tiny_sd.tiny_unet("sd15").state_dict()) == "sd15"
    assert sc.detect_family(tiny_sd.tiny_unet("sdxl").state_dict()) == "sdxl"
    sd2 = comp.read_json(comp.SHIPPED_CONFIGS / "sd15" / "unet" / "config.json")
    sd2.update(cross_attention_dim=1024, use_linear_projection=True)
    with pytest.raises(ValueError, match="2.x"):
        sc.detect_family(sd2)
    refiner = {
        "block_out_channels": [384] * 4,
        "cross_attention_dim": 1280,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560,
    }
    with pytest.raises(ValueError, match="refiner"):
        sc.detect_family(refiner)
    with pytest.raises(ValueError, match="2.x"):
        sc.detect_family({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a Stable Diffusion"):
        sc.detect_family({"encoder.weight": torch.zeros(1)})


def test_wrong_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CorruptCheckpointError, match="broken.safetensors"):
        sc.load_sd_parts(bad)
    other = tmp_path / "upscaler.safetensors"
    save_file({"body.0.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=r"upscaler\.safetensors.*not a Stable Diffusion"):
        sc.load_sd_parts(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sc.load_sd_parts(tmp_path / "nothing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        sc.load_sd_parts(tmp_path / "folder")
    with pytest.raises(ValueError, match="family must be"):
        sc.load_sd_parts(other, family="sd2")


def test_key_mismatches_are_named(tmp_path, config_root, caplog):
    from safetensors.torch import load_file, save_file

    parts = tiny_sd.tiny_sd_parts("sd15", tmp_path / "tok")
    state = load_file(str(sc.export_single_file(parts, tmp_path / "m.safetensors")))
    gone = "model.diffusion_model.out.2.weight"
    broken = {k: v for k, v in state.items() if k != gone}
    broken["first_stage_model.decoder.extra.weight"] = torch.zeros(1)
    broken["model.diffusion_model.out.0.bias"] = torch.zeros(3)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(KeyMismatchError) as err:
        sc.load_sd_parts(tmp_path / "broken.safetensors", config_root=config_root)
    text = str(err.value)
    assert gone in text and "first_stage_model.decoder.extra.weight" in text
    assert "shape mismatch model.diffusion_model.out.0.bias" in text and "broken.safetensors" in text
    # Known by-products are skipped; keys outside the SD components are named in a warning.
    extras = dict(state, betas=torch.zeros(1000), **{"model_ema.decay": torch.tensor(0.9999)})
    extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    extras["lora_te_text_model.alpha"] = torch.ones(())
    save_file(extras, str(tmp_path / "extras.safetensors"))
    with caplog.at_level(logging.WARNING):
        sc.load_sd_parts(tmp_path / "extras.safetensors", config_root=config_root)
    assert "lora_te_text_model.alpha" in caplog.text and "betas" not in caplog.text


def test_original_ckpt_layout_loads(tmp_path, config_root):
    """An original-style .ckpt: weights under 'state_dict', Conv-shaped VAE attention, v_pred marker."""
    from safetensors.torch import load_file

    parts = tiny_sd.tiny_sd_parts("sdxl", tmp_path / "tok")
    state = load_file(str(sc.export_single_file(parts, tmp_path / "m.safetensors")))
    q = "first_stage_model.encoder.mid.attn_1.q.weight"
    assert state[q].dim() == 4  # LDM writes VAE attention as 1x1 convolutions
    state[q] = state[q][:, :, 0, 0].clone()  # some tools save them flattened: both are accepted
    state["v_pred"] = torch.tensor([])
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "m.ckpt")
    loaded = sc.load_sd_parts(tmp_path / "m.ckpt", config_root=config_root)
    _assert_same_weights(parts.vae, loaded.vae)
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="sdxl model, but family='sd15'"):
        sc.load_sd_parts(tmp_path / "m.ckpt", family="sd15", config_root=config_root)


COMFY_CHECK = """
import sys, torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, {comfy!r})
import comfy.options; comfy.options.enable_args_parsing()
import comfy.model_detection, comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL
from priorface.inference import sd_checkpoints as sc, sd_components as comp, sd_keymap as km

ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)
def shapes(sd, prefix=""):
    return {{k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}}
for family, expected in (("sd15", "SD15"), ("sdxl", "SDXL")):
    configs = comp.read_component_configs(comp.config_dir(None, family), family)
    full = {{}}
    for name, kind in comp.COMPONENTS[family].items():
        canon = comp.canonical_state(kind, comp.build_meta(kind, configs[name]))
        full.update(km.to_single_file(km.component_ops(kind, family, canon), canon))
    mc = comp_cfg = comfy.model_detection.model_config_from_unet(full, "model.diffusion_model.")
    assert type(mc).__name__ == expected, type(mc).__name__
    unet_cfg = {{k: v for k, v in mc.unet_config.items() if k != "disable_unet_model_creation"}}
    with torch.device("meta"):
        unet = UNetModel(**unet_cfg, device="meta", operations=comfy.ops.disable_weight_init)
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        clip_sd = mc.process_clip_state_dict(dict(full))
        clip = mc.clip_target(clip_sd).clip(device="meta", dtype=torch.float16)
    assert shapes(unet.state_dict()) == shapes(full, "model.diffusion_model.")
    assert shapes(vae.state_dict()) == shapes(full, "first_stage_model.")
    own = shapes(clip.state_dict())
    own = {{k: v for k, v in own.items() if not k.endswith(("logit_scale", "clip_l.transformer.text_projection.weight"))}}
    assert own == shapes(clip_sd), sorted(set(own) ^ set(shapes(clip_sd)))[:5]
    print(family, "ok")
"""


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("PRIORFACE_COMFYUI_DIR"), reason="set PRIORFACE_COMFYUI_DIR")
def test_comfyui_detects_exported_layout():
    """Real ComfyUI recognises the real-size key layout as SD15/SDXL and its modules take every tensor."""
    script = COMFY_CHECK.format(comfy=str(Path(os.environ["PRIORFACE_COMFYUI_DIR"]).expanduser()))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sd15 ok" in run.stdout and "sdxl ok" in run.stdout
