"""AuthFace sampler: matches diffusers' SDXL ControlNet pipeline, seeds, strength, CFG, tiling, interruption."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")

import tiny_sd  # noqa: E402

from priorface.inference import progress  # noqa: E402
from priorface.inference.authface_loading import controlnet_config_from_shapes, load_controlnet  # noqa: E402
from priorface.inference.authface_restore import restore_faces  # noqa: E402
from priorface.inference.authface_sampler import (  # noqa: E402
    AuthFaceModel,
    AuthFaceSettings,
    encode_conditioning,
    make_scheduler,
    sample_latents,
)
from priorface.inference.color_correction import adain_color_fix  # noqa: E402
from priorface.inference.sd_prompts import encode_prompts  # noqa: E402
from priorface.models.checkpoint import KeyMismatchError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

FAST = AuthFaceSettings(steps=3, seed=5, color_fix="none")
SIZE = 32


def tiny_controlnet(unet, seed: int = 3):
    """ControlNet.from_unet with small random zero convs, so the control image changes the output."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet).eval()
    g = torch.Generator().manual_seed(seed)
    zero = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for p in (p for m in zero for p in m.parameters()):
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    return controlnet


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_sd.tiny_sd_parts("sdxl", tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(parts):
    def encode(texts):
        e = encode_prompts(parts, texts)
        return e.embeds, e.pooled

    return AuthFaceModel(
        parts.unet, parts.vae, tiny_controlnet(parts.unet), dict(parts.scheduler_config), encode, "tiny"
    )


@pytest.fixture(scope="module")
def control():
    torch.manual_seed(0)
    return torch.rand(1, 3, SIZE, SIZE)


def run(model, control, settings=FAST):
    cond = encode_conditioning(model, settings, tuple(control.shape[-2:]))
    generator = torch.Generator().manual_seed(settings.seed)
    return sample_latents(model, control, cond, settings, generator)


def reference(model, parts, control, settings):
    """The same sampling by diffusers' StableDiffusionXLControlNetPipeline (explicit embeddings and noise)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    pipe = StableDiffusionXLControlNetPipeline(
        vae=model.vae,
        text_encoder=parts.text_encoders[0],
        text_encoder_2=parts.text_encoders[1],
        tokenizer=parts.tokenizers[0],
        tokenizer_2=parts.tokenizers[1],
        unet=model.unet,
        controlnet=model.controlnet,
        scheduler=make_scheduler(settings.scheduler, model.scheduler_config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pos, neg = encode_prompts(parts, [settings.prompt]), encode_prompts(parts, [settings.negative_prompt])
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)
    out = pipe(
        image=control,
        height=SIZE,
        width=SIZE,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        controlnet_conditioning_scale=settings.control_strength,
        prompt_embeds=pos.embeds,
        pooled_prompt_embeds=pos.pooled,
        negative_prompt_embeds=neg.embeds,
        negative_pooled_prompt_embeds=neg.pooled,
        latents=noise,
        generator=generator,
        output_type="latent",
    )
    return out.images


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        replace(FAST, scheduler="ddim", control_strength=0.7),
        replace(FAST, scheduler="ddpm"),
        replace(FAST, scheduler="euler"),
        replace(FAST, scheduler="ddim", guidance=3.0, prompt="a face", negative_prompt="blurry"),
    ],
    ids=["ddim", "ddpm", "euler", "ddim-cfg"],
)
def test_matches_diffusers_sdxl_controlnet_pipeline(model, parts, control, settings):
    ours = run(model, control, settings)
    theirs = reference(model, parts, control, settings)
    assert ours.shape == theirs.shape == (1, 4, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_seed_is_deterministic_and_seeds_differ(model, control):
    a, b = run(model, control), run(model, control)
    c = run(model, control, replace(FAST, seed=6))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_control_strength_zero_equals_no_controlnet(model, control):
    zero = run(model, control, replace(FAST, control_strength=0.0))
    bare = run(replace(model, controlnet=None), control)
    full = run(model, control)
    torch.testing.assert_close(zero, bare, atol=1e-6, rtol=0)
    assert (zero - full).abs().mean() > 1e-3  # the ControlNet does matter at strength 1


def test_guidance_one_uses_the_prompt_alone(model, control):
    base = replace(FAST, prompt="a face", negative_prompt="blurry")
    one_a = run(model, control, replace(base, guidance=1.0))
    one_b = run(model, control, replace(base, guidance=1.0, negative_prompt="noisy"))
    three_a = run(model, control, replace(base, guidance=3.0))
    three_b = run(model, control, replace(base, guidance=3.0, negative_prompt="noisy"))
    assert torch.equal(one_a, one_b)
    assert (three_a - three_b).abs().mean() > 1e-4


def test_start_from_input_runs_the_last_part_of_the_schedule(model, control):
    calls = []
    hook = model.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        settings = replace(FAST, steps=4, start="input", denoise=0.5)
        a, b = run(model, control, settings), run(model, control, settings)
    finally:
        hook.remove()
    assert len(calls) == 4 and torch.equal(a, b)  # 2 steps per run
    assert (a - run(model, control)).abs().mean() > 1e-3


@pytest.mark.parametrize(
    "bad",
    [
        dict(steps=0),
        dict(scheduler="heun"),
        dict(start="lq"),
        dict(color_fix="hist"),
        dict(denoise=0.1, start="input"),
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AuthFaceSettings(**{**dict(steps=3), **bad})


def test_restore_crops_padding_and_applies_the_colour_fix(model):
    torch.manual_seed(1)
    faces = torch.rand(2, 3, 30, 21)
    raw = restore_faces(model, faces, replace(FAST, steps=2), size=None)
    fixed = restore_faces(model, faces, replace(FAST, steps=2, color_fix="adain"), size=None)
    assert raw.shape == faces.shape and fixed.shape == faces.shape
    torch.testing.assert_close(fixed, adain_color_fix(raw, faces), atol=1e-5, rtol=0)
    # Face i uses seed + i: the second face alone with seed + 1 gives the same result.
    alone = restore_faces(model, faces[1:], replace(FAST, steps=2, seed=FAST.seed + 1), size=None)
    torch.testing.assert_close(alone, raw[1:], atol=1e-6, rtol=0)


def test_vae_tiling(model):
    torch.manual_seed(2)
    faces = torch.rand(1, 3, 64, 64)
    whole = restore_faces(model, faces, replace(FAST, steps=1), size=None)
    one_tile = restore_faces(model, faces, replace(FAST, steps=1, vae_tile=64), size=None)
    tiled = restore_faces(model, faces, replace(FAST, steps=1, vae_tile=32, vae_overlap=16), size=None)
    assert torch.equal(whole, one_tile)  # a tile covering the image is the untiled path
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert (tiled - whole).abs().mean() < 0.1


class _StopAfter:
    def __init__(self, n):
        self.n, self.checks = n, 0

    def start(self, total, desc):
        return progress.HeadlessBackend().start(total, desc)

    def check_interrupted(self):
        self.checks += 1
        if self.checks > self.n:
            raise progress.InterruptedByUser("stop")


def test_interruption_stops_between_steps(model, control):
    calls = []
    hook = model.unet.register_forward_hook(lambda *_: calls.append(1))
    progress.set_backend(_StopAfter(2))
    try:
        with pytest.raises(progress.InterruptedByUser):
            restore_faces(model, control, replace(FAST, steps=10), size=None)
    finally:
        progress.set_backend(None)
        hook.remove()
    assert 1 <= len(calls) <= 2


def test_controlnet_file_without_config_loads_with_the_unet_architecture(model, control, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "authface_controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.controlnet.state_dict().items()}, str(path))
    assert controlnet_config_from_shapes(model.controlnet.state_dict())[
        "conditioning_embedding_out_channels"
    ] == (
        16,
        32,
        96,
        256,
    )
    loaded = load_controlnet(path, model.unet)
    torch.testing.assert_close(
        run(replace(model, controlnet=loaded), control), run(model, control), atol=0, rtol=0
    )
    model.controlnet.save_pretrained(tmp_path / "folder")
    assert isinstance(load_controlnet(tmp_path / "folder"), type(model.controlnet))


def test_controlnet_file_errors(model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.controlnet.state_dict().items()}
    save_file({"control_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(ValueError, match="LDM"):
        load_controlnet(tmp_path / "ldm.safetensors", model.unet)
    state.pop("controlnet_mid_block.weight")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(KeyMismatchError, match="controlnet_mid_block.weight"):
        load_controlnet(tmp_path / "partial.safetensors", model.unet)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_controlnet(tmp_path, model.unet)
