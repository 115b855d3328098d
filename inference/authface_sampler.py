"""AuthFace stage II sampling: the face-tuned SDXL UNet guided by a ControlNet that sees the degraded face.

One image at a time (papers.md section 2):

1. the control image is the degraded face in [0, 1] at the output size, padded (replicate) to a
   multiple of 8 (the caller crops back); the same [0, 1] range as diffusers' SDXL ControlNet
   pipeline and ComfyUI's ControlNetApply hint;
2. text conditioning is the *null prompt* by default: "" through both SDXL text encoders (real
   encodings, not zeros, as ComfyUI's CLIPTextEncode gives); a prompt and a negative prompt with
   classifier-free guidance are optional. SDXL micro-conditioning (time ids) is the generated size,
   no crop;
3. start latent: pure noise, or (``start="input"``) the VAE latent of the control image noised to
   the first timestep of the last ``denoise`` fraction of the schedule (img2img);
4. DDPM, DDIM (eta 0) or Euler, built from the SD training scheduler config; at each step the
   ControlNet residuals (times ``control_strength``) are added to the UNet, and with guidance > 1
   ``eps = eps_neg + guidance * (eps_pos - eps_neg)`` over the batch [negative, positive].

Every random draw uses the CPU ``torch.Generator`` passed in, so a seed gives the same result on
every device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .color_correction import COLOR_CORRECTIONS
from .progress import check_interrupted
from .xpsr_vae import VAE_FACTOR, encode_latents

log = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "ddpm", "euler")
START_MODES = ("noise", "input")

# texts -> (token embeddings [n, 77, D], pooled embeddings [n, P]), e.g. sd_prompts.encode_prompts.
TextEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AuthFaceSettings:
    """How to sample; see the module docstring. VAE tiles are in image pixels (0 = whole image)."""

    steps: int = 30
    scheduler: str = "ddim"
    guidance: float = 1.0
    control_strength: float = 1.0
    prompt: str = ""
    negative_prompt: str = ""
    start: str = "noise"
    denoise: float = 1.0  # start="input": the fraction of the schedule that is run
    seed: int = 0
    color_fix: str = "wavelet"
    vae_tile: int = 0
    vae_overlap: int = 64

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of {SCHEDULERS}")
        if self.start not in START_MODES:
            raise ValueError(f"unknown start {self.start!r}; expected one of {START_MODES}")
        if self.color_fix not in COLOR_CORRECTIONS:
            raise ValueError(f"unknown color fix {self.color_fix!r}; expected one of {COLOR_CORRECTIONS}")
        if self.guidance < 0 or self.control_strength < 0:
            raise ValueError(
                f"guidance and control_strength must be >= 0, got {self.guidance} and {self.control_strength}"
            )
        if not 0.0 < self.denoise <= 1.0 or self.steps_run < 1:
            raise ValueError(
                f"denoise must be in (0, 1] and leave at least one of the {self.steps} steps, got {self.denoise}"
            )
        if self.vae_tile < 0 or self.vae_overlap < 0:
            raise ValueError(
                f"vae_tile and vae_overlap must be >= 0, got {self.vae_tile}, {self.vae_overlap}"
            )

    @property
    def steps_run(self) -> int:
        """Denoising steps actually run (fewer than ``steps`` when starting from the input)."""
        return self.steps if self.start == "noise" else min(self.steps, int(self.steps * self.denoise))

    @property
    def guided(self) -> bool:
        """True when CFG changes anything: guidance above 1 and a negative prompt unlike the prompt."""
        return self.guidance > 1.0 and self.prompt != self.negative_prompt


@dataclass
class AuthFaceModel:
    """Stage I SDXL UNet and VAE, the stage II ControlNet (None: UNet alone), text encoding, schedule."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    controlnet: torch.nn.Module | None
    scheduler_config: dict
    encode_text: TextEncoder
    name: str = "authface"

    @property
    def device(self) -> torch.device:
        """Device of the UNet (all parts live there)."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the UNet and ControlNet."""
        return next(self.unet.parameters()).dtype


@dataclass
class Conditioning:
    """Text embeddings, pooled embeddings and SDXL time ids for one image: rows [negative, positive] or [positive]."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def to(self, device, dtype) -> Conditioning:
        """Copy on ``device`` in ``dtype``."""
        return Conditioning(*(t.to(device, dtype) for t in (self.embeds, self.pooled, self.time_ids)))


def make_scheduler(name: str, config: dict | None):
    """A diffusers DDIM, DDPM or Euler scheduler from an SD scheduler config (SDXL values fill gaps)."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}")
    from .sd_components import scheduler_defaults

    # SDXL's shipped training schedule fills gaps: diffusers' own defaults differ (linear betas,
    # clip_sample=True, DDIM's set_alpha_to_one=True).
    cfg = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    return classes[name].from_config({**scheduler_defaults("sdxl"), "set_alpha_to_one": False, **cfg})


def encode_conditioning(
    model: AuthFaceModel, settings: AuthFaceSettings, size: tuple[int, int]
) -> Conditioning:
    """Prompt (null by default) and, with CFG, negative prompt; time ids for an image of ``size`` (h, w)."""
    from .sd_prompts import sdxl_time_ids

    texts = [settings.negative_prompt, settings.prompt] if settings.guided else [settings.prompt]
    if settings.guidance > 1.0 and not settings.guided:
        log.info("guidance %.2f has no effect: the prompt and negative prompt are equal", settings.guidance)
    with torch.no_grad():
        embeds, pooled = model.encode_text(texts)
    time_ids = torch.as_tensor(
        sdxl_time_ids(tuple(size), (0, 0), tuple(size), len(texts)), dtype=torch.float32
    )
    return Conditioning(embeds.float(), pooled.float(), time_ids.reshape(len(texts), -1))


def predict_noise(
    model: AuthFaceModel, latents, t, cond: Conditioning, control, strength: float
) -> torch.Tensor:
    """Model output for a batch laid out like ``cond`` (ControlNet residuals times ``strength`` added)."""
    dtype = model.dtype
    latents, control = latents.to(dtype), control.to(dtype)
    kwargs = dict(
        encoder_hidden_states=cond.embeds,
        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids},
    )
    down = mid = None
    if model.controlnet is not None:
        down, mid = model.controlnet(
            latents, t, controlnet_cond=control, conditioning_scale=strength, return_dict=False, **kwargs
        )
    out = model.unet(
        latents, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs
    )
    return out.sample.float()


def guided_noise(model: AuthFaceModel, latents, t, cond: Conditioning, control, settings) -> torch.Tensor:
    """Model output for one latent: CFG over [negative, positive] when the settings ask for it."""
    n = cond.embeds.shape[0]
    eps = predict_noise(
        model, torch.cat([latents] * n), t, cond, torch.cat([control] * n), settings.control_strength
    )
    if n == 1:
        return eps
    eps_neg, eps_pos = eps.chunk(2)
    return eps_neg + settings.guidance * (eps_pos - eps_neg)


def start_latents(model: AuthFaceModel, scheduler, control, settings: AuthFaceSettings, generator):
    """(initial latent, timesteps to run): scaled noise, or the control image's latent noised (img2img)."""
    shape = (
        1,
        model.unet.config.in_channels,
        control.shape[-2] // VAE_FACTOR,
        control.shape[-1] // VAE_FACTOR,
    )
    timesteps = scheduler.timesteps
    if settings.start == "noise":
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(control.device)
        return noise * scheduler.init_noise_sigma, timesteps
    first = (settings.steps - settings.steps_run) * scheduler.order
    timesteps = timesteps[first:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)  # Euler looks sigmas up from here
    tile, overlap = settings.vae_tile, settings.vae_overlap
    z = encode_latents(model.vae, control, generator, tile, overlap).float()
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device)
    return scheduler.add_noise(z, noise, timesteps[:1]), timesteps


def sample_latents(
    model: AuthFaceModel,
    control: torch.Tensor,
    cond: Conditioning,
    settings: AuthFaceSettings,
    generator: torch.Generator,
    bar=None,
) -> torch.Tensor:
    """Denoised latent for one control image (1, 3, H, W) in [0, 1], H and W multiples of 8."""
    if (
        control.dim() != 4
        or control.shape[0] != 1
        or control.shape[-1] % VAE_FACTOR
        or control.shape[-2] % VAE_FACTOR
    ):
        raise ValueError(
            f"expected one control image (1, 3, H, W) with H, W multiples of 8, got {tuple(control.shape)}"
        )
    scheduler = make_scheduler(settings.scheduler, model.scheduler_config)
    scheduler.set_timesteps(settings.steps, device=control.device)
    latents, timesteps = start_latents(model, scheduler, control, settings, generator)
    cond = cond.to(control.device, model.dtype)
    with torch.no_grad():
        for t in timesteps:
            check_interrupted()
            x = scheduler.scale_model_input(latents, t)
            eps = guided_noise(model, x, t, cond, control, settings)
            latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
            if bar is not None:
                bar.update(1)
    return latents
