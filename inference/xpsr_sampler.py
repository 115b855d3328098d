"""XPSR x4 super-resolution: DDPM sampling of the XPSR UNet + ControlNet with two-prompt CFG.

Follows the official inference (papers.md section 3.7; qyp2000/XPSR ``test.py``,
``pipelines/pipeline_xpsr.py``):

1. the LR image is resized x``upscale`` (bicubic); if its short side is below ``process_size`` it
   is resized up to that (the official 512) and the result resized back at the end; the size is
   padded (replicate) to a multiple of 8 and cropped back afterwards (the official code floors
   the size instead, losing up to 7 px);
2. start latent: ``"lr"`` = VAE sample of the upsampled LR, noised to the first timestep and then
   again to ``added_noise_level`` (800) exactly as the official code; ``"noise"`` = pure noise;
3. DDPM (``DDPMScheduler`` from the SD scheduler config) for ``steps`` steps; at each step the
   ControlNet (control image = upsampled LR in [0, 1]) and the UNet see the batch
   [negative, positive] and ``eps = eps_neg + guidance * (eps_pos - eps_neg)``; ``guidance <= 1``
   runs the positive branch alone;
4. latents larger than ``latent_tile`` are denoised in overlapping tiles (Gaussian blending) and
   the VAE encodes/decodes in tiles (linear blending), see inference/latent_tiling.py;
5. colour fix against the upsampled LR: AdaIN (official, always on), wavelet, or none.

Every random draw uses one CPU ``torch.Generator`` seeded with ``seed + image index``, so a seed
gives the same result on every device and each image of a batch its own noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .color_correction import COLOR_CORRECTIONS, apply_color_correction
from .images import resize_bchw
from .latent_tiling import tiled_map
from .progress import check_interrupted, progress_bar
from .xpsr_prompts import TextEncoder, XPSRConditioning, XPSRPrompts, encode_conditioning
from .xpsr_vae import VAE_FACTOR, decode_latents, encode_latents

log = logging.getLogger(__name__)

# (steps, guidance): the paper's "DDPM 50 steps, CFG 5.5" and the repository's configs/xpsr_test.yaml.
PRESETS = {"paper": (50, 5.5), "official": (20, 4.5)}
START_MODES = ("lr", "noise")


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample; see the module docstring. Tiles are in latent pixels (x8 = image pixels)."""

    steps: int = 20
    guidance: float = 4.5
    seed: int = 0
    start: str = "lr"
    added_noise_level: int = 800  # official test.py (the training-time validator uses 400)
    conditioning_scale: float = 1.0
    color_fix: str = "adain"
    upscale: float = 4.0
    process_size: int = 512
    latent_tile: int = 96  # SeeSR's default; XPSR's 320 ("for 24G") is 2560 px
    latent_overlap: int = 16
    vae_encode_tile: int = 1024  # image pixels, official
    vae_decode_tile: int = 128  # latent pixels (official 224)
    vae_overlap: int = 16  # latent pixels

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.start not in START_MODES:
            raise ValueError(f"unknown start {self.start!r}; expected one of {START_MODES}")
        if self.color_fix not in COLOR_CORRECTIONS:
            raise ValueError(f"unknown color fix {self.color_fix!r}; expected one of {COLOR_CORRECTIONS}")
        if not 1.0 <= self.upscale <= 16.0:
            raise ValueError(f"upscale must be in [1, 16], got {self.upscale}")
        if not 0 <= self.added_noise_level < 1000:
            raise ValueError(f"added_noise_level must be in [0, 999], got {self.added_noise_level}")


def preset_settings(preset: str, **changes) -> SamplerSettings:
    """Settings with the steps and guidance of a preset ("paper" or "official"), plus ``changes``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown XPSR preset {preset!r}; expected one of {tuple(PRESETS)}")
    steps, guidance = PRESETS[preset]
    return replace(SamplerSettings(steps=steps, guidance=guidance), **changes)


NoiseModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class XPSRDenoiser:
    """eps prediction of the XPSR ControlNet + UNet: ``(latents, t, high, low, control) -> eps``."""

    def __init__(self, unet, controlnet, conditioning_scale: float = 1.0, sfa_mode: str = "parallel"):
        self.unet, self.controlnet = unet, controlnet
        self.conditioning_scale, self.sfa_mode = conditioning_scale, sfa_mode

    def __call__(self, latents, t, high, low, control):
        """Noise prediction for a batch whose text embeddings are already laid out like ``latents``."""
        from ..models.xpsr_controlnet import controlnet_forward
        from ..models.xpsr_unet import unet_forward

        dtype = next(self.unet.parameters()).dtype
        latents, control = latents.to(dtype), control.to(dtype)
        high, low = high.to(dtype), low.to(dtype)
        res = controlnet_forward(
            self.controlnet, latents, t, high, control, low, self.conditioning_scale, self.sfa_mode
        )
        return unet_forward(
            self.unet, latents, t, high, res.down_block_res_samples, res.mid_block_res_sample
        ).float()


@dataclass
class XPSRPipeline:
    """Everything XPSR needs: its UNet and ControlNet, the SD VAE, text encoding and scheduler config."""

    unet: torch.nn.Module
    controlnet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    encode_text: TextEncoder | None = None
    name: str = "xpsr"

    @property
    def device(self) -> torch.device:
        """Device of the UNet (all parts live there)."""
        return next(self.unet.parameters()).device


def make_scheduler(config: dict | None):
    """A diffusers DDPMScheduler from an SD scheduler config (SD1.5 values fill what it lacks)."""
    from diffusers import DDPMScheduler

    from .sd_components import scheduler_defaults

    # The shipped SD1.5 schedule fills gaps: diffusers' own DDPM defaults differ (clip_sample=True
    # would clamp latents to [-1, 1]).
    cfg = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    return DDPMScheduler.from_config({**scheduler_defaults("sd15"), **cfg})


def guided_noise(model: NoiseModel, latents, t, cond: XPSRConditioning, control, guidance: float):
    """eps for one latent batch: CFG over [negative, positive] when ``guidance > 1``."""
    guided = guidance > 1.0
    high, low = cond.branches(guided)
    n = 2 if guided else 1
    eps = model(torch.cat([latents] * n), t, high, low, torch.cat([control] * n))
    if not guided:
        return eps
    eps_neg, eps_pos = eps.chunk(2)
    return eps_neg + guidance * (eps_pos - eps_neg)


def denoise_step(model: NoiseModel, latents, t, cond, control, settings: SamplerSettings):
    """eps over the whole latent, in overlapping tiles when it is larger than ``settings.latent_tile``."""

    def run(z, box):
        top, bottom, left, right = (v * VAE_FACTOR for v in box)
        return guided_noise(model, z, t, cond, control[:, :, top:bottom, left:right], settings.guidance)

    return tiled_map(run, latents, settings.latent_tile, settings.latent_overlap, 1, "gaussian")


def start_latents(scheduler, vae, control, settings: SamplerSettings, generator, shape) -> torch.Tensor:
    """Initial latent: pure noise, or the official doubly-noised VAE latent of the upsampled LR."""
    device = control.device
    if settings.start == "noise":
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise.to(device) * scheduler.init_noise_sigma
    tiles = (settings.vae_encode_tile, settings.vae_encode_tile // 8)
    z = encode_latents(vae, control, generator, *tiles)
    first = scheduler.timesteps[:1].to(device)
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(device)
    z = scheduler.add_noise(z, noise, first)
    added = torch.full((1,), settings.added_noise_level, dtype=torch.long, device=device)
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(device)
    return scheduler.add_noise(z, noise, added) * scheduler.init_noise_sigma


def sample_one(
    pipe: XPSRPipeline,
    control: torch.Tensor,
    cond: XPSRConditioning,
    settings: SamplerSettings,
    generator: torch.Generator,
    bar,
    model: NoiseModel | None = None,
) -> torch.Tensor:
    """Sample one image: ``control`` is the upsampled LR (1, 3, H, W), H and W multiples of 8; returns [0, 1]."""
    model = model or XPSRDenoiser(pipe.unet, pipe.controlnet, settings.conditioning_scale)
    scheduler = make_scheduler(pipe.scheduler_config)
    scheduler.set_timesteps(settings.steps, device=control.device)
    shape = (1, 4, control.shape[-2] // VAE_FACTOR, control.shape[-1] // VAE_FACTOR)
    latents = start_latents(scheduler, pipe.vae, control, settings, generator, shape)
    for t in scheduler.timesteps:
        check_interrupted()
        eps = denoise_step(model, latents, t, cond, control, settings)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
        bar.update(1)
    return decode_latents(pipe.vae, latents, settings.vae_decode_tile, settings.vae_overlap)


def prepare_control(
    image: torch.Tensor, settings: SamplerSettings
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(upsampled LR padded to multiples of 8, its size before padding, the output size)."""
    h, w = image.shape[-2:]
    out_size = (max(1, round(h * settings.upscale)), max(1, round(w * settings.upscale)))
    size = out_size
    if settings.process_size > 0 and min(size) < settings.process_size:
        # Official: SD works at >= 512 px; upsample further and resize back at the end.
        k = settings.process_size / min(size)
        size = (
            max(settings.process_size, round(size[0] * k)),
            max(settings.process_size, round(size[1] * k)),
        )
    up = resize_bchw(resize_bchw(image.float(), *out_size), *size)
    pad_h, pad_w = -size[0] % VAE_FACTOR, -size[1] % VAE_FACTOR
    if pad_h or pad_w:
        up = F.pad(up, (0, pad_w, 0, pad_h), mode="replicate")
    return up, size, out_size


@torch.no_grad()
def xpsr_upscale(
    pipe: XPSRPipeline,
    images: torch.Tensor,
    prompts: XPSRPrompts | list[XPSRConditioning],
    settings: SamplerSettings = SamplerSettings(),
    model: NoiseModel | None = None,
) -> torch.Tensor:
    """Super-resolve BCHW images in [0, 1] by ``settings.upscale``; returns CPU float32 BCHW in [0, 1].

    ``prompts`` are texts (encoded with ``pipe.encode_text``) or one conditioning per image.
    ``model`` replaces the XPSR ControlNet + UNet noise prediction (tests use a stand-in).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    batch = images.shape[0]
    device = pipe.device
    conds = [c.to(device) for c in _conditionings(pipe, prompts, batch)]
    outs = []
    with progress_bar(batch * settings.steps, "XPSR") as bar:
        for i in range(batch):
            generator = torch.Generator(device="cpu").manual_seed((settings.seed + i) % 2**64)
            control, size, out_size = prepare_control(images[i : i + 1].to(device), settings)
            sr = sample_one(pipe, control, conds[i], settings, generator, bar, model)
            sr = sr[:, :, : size[0], : size[1]]
            sr = apply_color_correction(sr, control[:, :, : size[0], : size[1]], settings.color_fix)
            outs.append(resize_bchw(sr.float(), *out_size).cpu())
    return torch.cat(outs)


def _conditionings(pipe, prompts, batch: int) -> list[XPSRConditioning]:
    if isinstance(prompts, XPSRPrompts):
        if pipe.encode_text is None:
            raise ValueError("this XPSR pipeline has no text encoder; pass encoded conditionings instead")
        with torch.no_grad():
            return [encode_conditioning(pipe.encode_text, prompts, i, batch) for i in range(batch)]
    conds = list(prompts)
    if len(conds) == 1:
        conds = conds * batch
    if len(conds) != batch:
        raise ValueError(f"got {len(conds)} conditionings for {batch} image(s); expected 1 or {batch}")
    return conds
