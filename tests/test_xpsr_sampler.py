"""XPSR sampler: official schedule, two-prompt CFG, seeds, tiling, colour fix, padding, interruption."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import tiny_sd  # noqa: E402

from priorface.inference import progress  # noqa: E402
from priorface.inference.color_correction import adain_color_fix, wavelet_color_fix  # noqa: E402
from priorface.inference.latent_tiling import tile_starts, tiled_map  # noqa: E402
from priorface.inference.xpsr_prompts import (  # noqa: E402
    LOWLEVEL_NEGATIVE_PROMPT,
    XPSRConditioning,
    XPSRPrompts,
    encode_conditioning,
    join_prompt,
    prompts_from_texts,
)
from priorface.inference.xpsr_sampler import (  # noqa: E402
    PRESETS,
    SamplerSettings,
    XPSRPipeline,
    guided_noise,
    make_scheduler,
    prepare_control,
    preset_settings,
    start_latents,
    xpsr_upscale,
)
from priorface.inference.xpsr_vae import decode_latents, encode_latents  # noqa: E402
from priorface.models.xpsr_controlnet import xpsr_controlnet_class  # noqa: E402
from priorface.models.xpsr_unet import xpsr_unet_from_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

FAST = SamplerSettings(
    steps=3, guidance=4.5, seed=7, process_size=0, latent_tile=0, vae_encode_tile=0, vae_decode_tile=0
)
SD15_SCHEDULER = {  # stable-diffusion-v1-5/scheduler/scheduler_config.json (PNDM), as a base model ships it
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.fixture(scope="module")
def pipe():
    sd_unet = tiny_sd.tiny_unet("sd15")
    torch.manual_seed(1)
    unet = xpsr_unet_from_sd(sd_unet).eval()
    controlnet = xpsr_controlnet_class().from_unet(sd_unet).eval()
    # Zero convs would hide the control image from the UNet; small random weights let it matter.
    g = torch.Generator().manual_seed(3)
    zero = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    for p in (p for m in zero for p in m.parameters()):
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    return XPSRPipeline(unet, controlnet, tiny_sd.tiny_vae(), SD15_SCHEDULER)


def _cond(seed=0, tokens=5):
    g = torch.Generator().manual_seed(seed)
    return XPSRConditioning(*(torch.randn(1, tokens, 24, generator=g) for _ in range(4)))


def _image(h=16, w=16, seed=0, batch=1):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _stand_in_pipe():
    # The noise model is replaced; the Linear only tells XPSRPipeline.device where to run.
    return XPSRPipeline(torch.nn.Linear(1, 1), None, tiny_sd.tiny_vae(), SD15_SCHEDULER)


class Pointwise:
    """Stand-in noise model whose output at a latent pixel depends only on that pixel (and the texts)."""

    def __init__(self):
        self.calls = []

    def __call__(self, latents, t, high, low, control):
        self.calls.append((tuple(latents.shape), high, low))
        ctrl = F.avg_pool2d(control, 8)  # the 8x8 image block under each latent pixel
        text = (high.mean(dim=(1, 2)) + 0.5 * low.mean(dim=(1, 2)))[:, None, None, None]
        return 0.3 * torch.tanh(latents) + ctrl.mean(1, keepdim=True) + text


def test_presets_and_official_timesteps():
    assert PRESETS == {"paper": (50, 5.5), "official": (20, 4.5)}
    assert (preset_settings("paper").steps, preset_settings("paper").guidance) == (50, 5.5)
    scheduler = make_scheduler(SD15_SCHEDULER)
    assert not scheduler.config.clip_sample and type(scheduler).__name__ == "DDPMScheduler"
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))  # papers.md 3.7: 951, 901, ..., 1
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    with pytest.raises(ValueError, match="unknown XPSR preset"):
        preset_settings("fast")


def test_official_prompt_texts():
    assert join_prompt("A cat on a mat.\n", "clean, 8k") == "A cat on a mat. clean, 8k"
    assert join_prompt("", "clean, 8k") == "clean, 8k"
    p = prompts_from_texts(["a", "b"], ["q1", "q2"], typed_low="sharp")
    assert p.for_image(1, 2) == (join_prompt("b", p.added), "sharp")
    assert p.low_negative == LOWLEVEL_NEGATIVE_PROMPT == "high resolution, best quality, clear"
    with pytest.raises(ValueError, match="describe 2 image"):
        p.for_image(0, 3)


def test_two_prompt_cfg_batches_negative_first_and_combines():
    model, cond = Pointwise(), _cond()
    latents, control = torch.randn(1, 4, 2, 2), torch.rand(1, 3, 16, 16)
    eps = guided_noise(model, latents, torch.tensor(500), cond, control, 5.5)
    (_, high, low) = model.calls[0]
    assert torch.equal(high, torch.cat([cond.high_negative, cond.high]))
    assert torch.equal(low, torch.cat([cond.low_negative, cond.low]))
    neg = model(latents, 0, cond.high_negative, cond.low_negative, control)
    pos = model(latents, 0, cond.high, cond.low, control)
    torch.testing.assert_close(eps, neg + 5.5 * (pos - neg))
    # guidance 1: one pass, positive branch only
    torch.testing.assert_close(guided_noise(model, latents, 500, cond, control, 1.0), pos)
    assert model.calls[-1][0][0] == 1


def test_sampler_is_seeded_and_cfg_reduces_to_conditional(pipe):
    image, cond = _image(), _cond()
    a = xpsr_upscale(pipe, image, [cond], FAST)
    assert (
        a.shape == (1, 3, 64, 64) and a.dtype == torch.float32 and 0 <= float(a.min()) <= float(a.max()) <= 1
    )
    assert torch.equal(a, xpsr_upscale(pipe, image, [cond], FAST))
    assert (a - xpsr_upscale(pipe, image, [cond], replace(FAST, seed=8))).abs().max() > 1e-3
    # Guidance 1 ignores the negatives; CFG with negatives equal to the positives is the same thing.
    plain = xpsr_upscale(pipe, image, [cond], replace(FAST, guidance=1.0))
    other_neg = replace(cond, high_negative=_cond(5).high, low_negative=_cond(6).low)
    assert torch.equal(plain, xpsr_upscale(pipe, image, [other_neg], replace(FAST, guidance=1.0)))
    same = XPSRConditioning(cond.high, cond.low, cond.high, cond.low)
    torch.testing.assert_close(xpsr_upscale(pipe, image, [same], FAST), plain, atol=2e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-3  # the real negatives do change the result


def test_batch_images_get_their_own_noise():
    model, pipe = Pointwise(), _stand_in_pipe()
    image = _image(8, 8).expand(2, -1, -1, -1)
    settings = replace(FAST, start="noise")
    both = xpsr_upscale(pipe, image, [_cond()], settings, model)
    assert (both[0] - both[1]).abs().max() > 1e-4  # same image, different noise (seed + index)
    first = xpsr_upscale(pipe, image[:1], [_cond()], settings, model)
    assert torch.equal(both[:1], first)


@pytest.mark.parametrize("weight", ["gaussian", "linear"])
@pytest.mark.parametrize("scale", [1, 8, 1 / 8])
def test_tiled_map_is_exact_for_pointwise_functions(weight, scale):
    x = torch.randn(2, 3, 48, 40)
    if scale == 8:
        fn = lambda t, _box: F.interpolate(torch.sin(t), scale_factor=8, mode="nearest")  # noqa: E731
    elif scale == 1:
        fn = lambda t, _box: torch.sin(t) * 2  # noqa: E731
    else:
        fn = lambda t, _box: F.avg_pool2d(torch.sin(t), 8)  # noqa: E731
    whole = fn(x, None)
    calls = []

    def counted(t, box):
        calls.append(box)
        return fn(t, box)

    tiled = tiled_map(counted, x, 16, 8, scale, weight, align=8 if scale < 1 else 1)
    assert len(calls) > 4
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=1e-6)
    assert tile_starts(40, 16, 8) == [0, 8, 16, 24] and tile_starts(10, 16, 4) == [0]


def test_tiled_sampler_matches_untiled_with_a_position_independent_model():
    model, pipe = Pointwise(), _stand_in_pipe()
    image, cond = _image(32, 48), _cond()
    settings = replace(FAST, start="noise")
    whole = xpsr_upscale(pipe, image, [cond], settings, model)
    n_whole = len(model.calls)
    tiled = xpsr_upscale(pipe, image, [cond], replace(settings, latent_tile=8, latent_overlap=4), model)
    assert len(model.calls) - n_whole > 3 * n_whole  # really ran tile by tile
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_tiles_covering_the_image_are_bit_identical(pipe):
    image, cond = _image(), _cond()
    whole = xpsr_upscale(pipe, image, [cond], FAST)
    covering = replace(FAST, latent_tile=16, vae_encode_tile=128, vae_decode_tile=16)
    assert torch.equal(xpsr_upscale(pipe, image, [cond], covering), whole)
    # Real VAE/UNet tiles differ at seams (convolution padding, attention), but stay close to the whole.
    split = replace(FAST, latent_tile=12, latent_overlap=4)
    assert (xpsr_upscale(pipe, image, [cond], split) - whole).abs().mean() < 0.05


def test_tiled_vae_round_trip_matches_untiled_when_tile_covers():
    vae, image = tiny_sd.tiny_vae(), _image(32, 40)
    with torch.no_grad():
        z = encode_latents(vae, image, torch.Generator().manual_seed(0))
        assert torch.equal(z, encode_latents(vae, image, torch.Generator().manual_seed(0), tile=40))
        assert torch.equal(decode_latents(vae, z), decode_latents(vae, z, tile=5))
        tiled = encode_latents(vae, image, torch.Generator().manual_seed(0), tile=16, overlap=8)
    assert tiled.shape == z.shape and (tiled - z).abs().mean() < 0.5 * z.abs().mean()


@pytest.mark.parametrize("fix", ["adain", "wavelet"])
def test_colour_fix_is_applied_against_the_upsampled_input(fix):
    model, pipe = Pointwise(), _stand_in_pipe()
    image = _image(8, 10)
    settings = replace(FAST, color_fix="none")
    raw = xpsr_upscale(pipe, image, [_cond()], settings, model)
    fixed = xpsr_upscale(pipe, image, [_cond()], replace(settings, color_fix=fix), model)
    reference = prepare_control(image, settings)[0][:, :, :32, :40]
    want = (adain_color_fix if fix == "adain" else wavelet_color_fix)(raw, reference)
    torch.testing.assert_close(fixed, want, atol=1e-6, rtol=0)
    assert (fixed - raw).abs().max() > 1e-3


def test_odd_sizes_are_padded_and_cropped_and_small_images_processed_at_512():
    model, pipe = Pointwise(), _stand_in_pipe()
    out = xpsr_upscale(pipe, _image(13, 10), [_cond()], replace(FAST, steps=1), model)
    assert out.shape == (1, 3, 52, 40)
    assert model.calls[-1][0][-2:] == (7, 5)  # 52 x 40 padded to 56 x 40
    out = xpsr_upscale(pipe, _image(8, 12), [_cond()], replace(FAST, steps=1, process_size=64), model)
    assert out.shape == (1, 3, 32, 48) and model.calls[-1][0][-2:] == (8, 12)  # sampled at 64 x 96


class _FixedVAE(torch.nn.Module):
    """Encoder stand-in returning a chosen latent mean with (almost) zero variance."""

    def __init__(self, mean):
        super().__init__()
        self.mean = torch.nn.Parameter(mean, requires_grad=False)
        self.config = type("C", (), {"scaling_factor": 1.0})()

    def encode(self, x):
        moments = torch.cat([self.mean, torch.full_like(self.mean, -30.0)], 1)
        return type("E", (), {"latent_dist": type("D", (), {"parameters": moments})()})()


def test_lr_start_keeps_the_official_faint_lr_component():
    scheduler = make_scheduler(SD15_SCHEDULER)
    scheduler.set_timesteps(20)
    control, settings = torch.zeros(1, 3, 16, 16), replace(FAST, steps=20)
    a_mean, b_mean = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    a = start_latents(scheduler, _FixedVAE(a_mean), control, settings, torch.Generator().manual_seed(0), None)
    b = start_latents(scheduler, _FixedVAE(b_mean), control, settings, torch.Generator().manual_seed(0), None)
    coef = ((a - b) / (a_mean - b_mean)).flatten()
    ab = scheduler.alphas_cumprod
    torch.testing.assert_close(
        coef, torch.full_like(coef, float((ab[951] * ab[800]).sqrt())), rtol=1e-4, atol=1e-6
    )
    assert 0.016 < float(coef[0]) < 0.018  # papers.md 3.7: "a coefficient of about 0.017"


def test_prompt_texts_are_encoded_in_one_call(tmp_path):
    encoder, tokenizer = tiny_sd.tiny_text_encoders("sd15")[0], tiny_sd.tiny_tokenizer(tmp_path / "tok")
    seen = []

    def encode(texts):
        seen.append(texts)
        ids = tokenizer(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return encoder(ids).last_hidden_state

    prompts = XPSRPrompts(high=("a dog",), low=("blurry, noisy",))
    with torch.no_grad():
        cond = encode_conditioning(encode, prompts, 0, 3)
    assert seen == [["a dog " + prompts.added, "blurry, noisy", prompts.negative, LOWLEVEL_NEGATIVE_PROMPT]]
    assert cond.high.shape == (1, 77, 24) and (cond.high - cond.high_negative).abs().max() > 1e-3


class _StopAfter:
    def __init__(self, n):
        self.n = n

    def start(self, total, desc):
        return type("H", (), {"update": lambda *a, **k: None, "close": lambda self: None})()

    def check_interrupted(self):
        self.n -= 1
        if self.n < 0:
            raise progress.InterruptedByUser("stop")


def test_interruption_stops_between_steps():
    model, pipe = Pointwise(), _stand_in_pipe()
    progress.set_backend(_StopAfter(3))
    try:
        with pytest.raises(progress.InterruptedByUser):
            xpsr_upscale(pipe, _image(8, 8), [_cond()], replace(FAST, steps=20), model)
    finally:
        progress.set_backend(None)
    assert 1 <= len(model.calls) <= 2  # stopped within two of the 20 steps


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown start"):
        SamplerSettings(start="latent")
    with pytest.raises(ValueError, match="color fix"):
        SamplerSettings(color_fix="histogram")
    with pytest.raises(ValueError, match="expected 1 or 2"):
        xpsr_upscale(
            XPSRPipeline(torch.nn.Linear(1, 1), None, None, {}), _image(batch=2), [_cond()] * 3, FAST
        )
