"""Pieces both AuthFace trainers share: frozen SDXL parts, latents, micro-conditioning, noise, sampling.

Every random draw of a training step (latent posterior sample, noise, timesteps) comes from the
global CPU generator, whose state the training checkpoint stores, so a resumed run repeats the
same draws on any device. Validation samples go through the user-facing sampler
(inference/authface_sampler.py), so what the curves show is what the nodes will produce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F

from .authface_data import AuthFaceDataConfig, AuthFaceDataset, collate_faces
from .loop import TrainConfig, TrainTask, autocast_dtype

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
VAL_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed timesteps of the held-out denoising loss
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_frozen_parts(
    source: str,
    family: str | None = "sdxl",
    tokenizer_dirs: list[str] | None = None,
    config_root: str | None = None,
    device: torch.device | str = "cpu",
    text_dtype: torch.dtype = torch.float32,
):
    """SDParts of ``source`` with VAE and text encoders frozen on ``device`` (the UNet stays in fp32 on CPU)."""
    from ..inference.sd_checkpoints import load_sd_parts

    parts = load_sd_parts(
        source, family=family, tokenizer_dirs=tokenizer_dirs, dtype=torch.float32, config_root=config_root
    )
    if parts.family != "sdxl":
        raise ValueError(f"AuthFace trains SDXL; {source} holds a {parts.family} model")
    # The SDXL VAE overflows in fp16, so it stays in fp32 whatever the run's precision.
    parts.vae.to(device).requires_grad_(False).eval()
    for enc in parts.text_encoders:
        enc.to(device, text_dtype).requires_grad_(False).eval()
    return parts


def frozen_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Dtype for frozen text encoders: the run's half precision on CUDA, fp32 otherwise."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def no_autocast(device: torch.device):
    """Context that turns autocast off (the frozen VAE runs in fp32 inside an autocast step)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def latents_of(vae, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """Scaled latents of images in [0,1], in fp32 without autocast; posterior noise from the CPU generator."""
    from ..inference.xpsr_vae import encode_latents

    with torch.no_grad(), no_autocast(images.device):
        return encode_latents(vae, images, None, sample=sample).float()


def cpu_randn(shape: tuple[int, ...] | torch.Size, device: torch.device) -> torch.Tensor:
    """Standard normal noise from the global CPU generator, moved to ``device`` (exact resume on GPU too)."""
    return torch.randn(tuple(shape)).to(device)


def cpu_timesteps(batch: int, num_train: int, device: torch.device) -> torch.Tensor:
    """Uniform training timesteps in [0, num_train) from the global CPU generator."""
    return torch.randint(0, num_train, (batch,)).to(device)


def time_ids(
    original_sizes: list[tuple[int, int]],
    crops: list[tuple[int, int]],
    target: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """SDXL micro-conditioning [B,6] with each sample's own original size and crop."""
    from ..inference.sd_prompts import sdxl_time_ids

    if len(original_sizes) != len(crops):
        raise ValueError(f"got {len(original_sizes)} sizes and {len(crops)} crops")
    rows = [
        sdxl_time_ids(tuple(o), tuple(c), tuple(target), 1)
        for o, c in zip(original_sizes, crops, strict=True)
    ]
    return torch.cat(rows).to(device)


def schedule(scheduler_config: dict[str, Any] | None) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod [T] float64, prediction_type) of the SD training schedule in ``scheduler_config``."""
    from ..inference.sd_components import scheduler_defaults
    from ..models.authface_facial import scaled_linear_alphas_cumprod

    cfg = {**scheduler_defaults("sdxl"), **(scheduler_config or {})}
    if cfg["beta_schedule"] != "scaled_linear" or cfg.get("rescale_betas_zero_snr"):
        raise ValueError(
            f"AuthFace trains on SDXL's scaled_linear schedule; got beta_schedule={cfg['beta_schedule']!r}, "
            f"rescale_betas_zero_snr={cfg.get('rescale_betas_zero_snr')}"
        )
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"unsupported prediction_type {cfg['prediction_type']!r}; expected {PREDICTION_TYPES}"
        )
    abar = scaled_linear_alphas_cumprod(
        int(cfg["num_train_timesteps"]), float(cfg["beta_start"]), float(cfg["beta_end"])
    )
    return abar, cfg["prediction_type"]


def _coefficients(
    abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    a = abar.to(like.device)[t.to(like.device)].reshape(-1, *([1] * (like.dim() - 1)))
    return a.sqrt().to(like.dtype), (1.0 - a).sqrt().to(like.dtype)


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """Forward process z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps."""
    a, b = _coefficients(abar, t, latents)
    return a * latents + b * noise


def noise_target(
    latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet is trained to output: eps (epsilon) or v = sqrt(abar) eps - sqrt(1 - abar) z0."""
    if prediction_type == "epsilon":
        return noise
    a, b = _coefficients(abar, t, latents)
    return a * noise - b * latents


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (Eq. 1 of AuthFace; the standard LDM objective)."""
    return F.mse_loss(pred.float(), target.float())


def initial_noise(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Start noise drawn on CPU from ``seed`` (the same picture on every device)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g).to(device)


def unet_kwargs(embeds, time_ids_: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments of an SDXL UNet/ControlNet forward for prompt embeddings and micro-conditioning."""
    # fp32 here; autocast lowers what it should (frozen encoders may run in half precision).
    return {
        "encoder_hidden_states": embeds.embeds.float(),
        "added_cond_kwargs": {"text_embeds": embeds.pooled.float(), "time_ids": time_ids_.float()},
    }


def sampling_model(parts, unet, controlnet=None):
    """The user-facing sampler's AuthFaceModel around the run's networks (prompts via the frozen encoders)."""
    from ..inference.authface_sampler import AuthFaceModel
    from ..inference.sd_prompts import encode_prompts

    def encode_text(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = encode_prompts(parts, texts)
        return embeds.embeds, embeds.pooled

    return AuthFaceModel(
        unet, parts.vae, controlnet, dict(parts.scheduler_config or {}), encode_text, "validation"
    )


def sample_images(net, controls: torch.Tensor, settings: list, amp: torch.dtype | None) -> torch.Tensor:
    """One image per control image [B,3,H,W] and AuthFaceSettings, through the user-facing sampler.

    Sampling runs in the run's autocast precision; decoding does not (the SDXL VAE overflows in
    fp16). Returns CPU float32 images in [0, 1].
    """
    from ..inference.authface_sampler import encode_conditioning, sample_latents
    from ..inference.xpsr_vae import decode_latents

    if controls.shape[0] != len(settings):
        raise ValueError(f"got {controls.shape[0]} control images and {len(settings)} settings")
    device = controls.device
    size = tuple(controls.shape[-2:])
    out = []
    for control, setting in zip(controls, settings, strict=True):
        generator = torch.Generator("cpu").manual_seed(setting.seed)
        with run_autocast(amp, device):
            cond = encode_conditioning(net, setting, size)
            latents = sample_latents(net, control[None], cond, setting, generator)
        with no_autocast(device):
            out.append(decode_latents(net.vae, latents.float()).float().cpu())
    return torch.cat(out)


def run_autocast(dtype: torch.dtype | None, device: torch.device):
    """Autocast context in the run's precision (nothing for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class AuthFaceTaskBase(TrainTask):
    """What both AuthFace stages share: frozen SDXL parts on the task, data, the held-out fixed-noise loss.

    Subclasses set ``name``, implement :meth:`data_config`, :meth:`conditioning` and
    :meth:`denoise` (model output for noisy latents of a batch), plus the TrainTask methods.
    The config must have base_model, tokenizer_dirs, config_root, resolution, train_dirs, val_dirs
    and val_items.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.parts = None
        self.device = torch.device("cpu")
        self.amp: torch.dtype | None = None
        self._val: dict | None = None

    def setup(self, device: torch.device, cfg: TrainConfig) -> None:
        c = self.cfg
        self.device = device
        self.parts = load_frozen_parts(
            c.base_model, "sdxl", c.tokenizer_dirs, c.config_root, device, frozen_dtype(cfg.precision, device)
        )
        self.abar, self.prediction_type = schedule(self.parts.scheduler_config)
        self.amp = autocast_dtype(cfg, device)

    def data_config(self, dirs: list[str], train: bool) -> AuthFaceDataConfig:
        """The data set of this run over ``dirs`` (train: random flips; else fixed)."""
        raise NotImplementedError

    def conditioning(self, batch: dict):
        """(prompt embeddings, time ids [B,6]) of a batch."""
        raise NotImplementedError

    def denoise(self, model, noisy: torch.Tensor, t: torch.Tensor, embeds, ids, batch: dict) -> torch.Tensor:
        """Model output (epsilon or v) for noisy latents of ``batch``."""
        raise NotImplementedError

    def train_set(self) -> AuthFaceDataset:
        return AuthFaceDataset(self.data_config(self.cfg.train_dirs, True))

    def collate(self, items: list[dict], device: torch.device) -> dict:
        return collate_faces(items, device)

    def noise_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 1 on a batch with fresh noise and timesteps; also returns the tensors the facial loss needs."""
        latents = latents_of(self.parts.vae, batch["hq"])
        noise = cpu_randn(latents.shape, latents.device)
        t = cpu_timesteps(latents.shape[0], self.abar.shape[0], latents.device)
        noisy = add_noise(latents, noise, t, self.abar)
        embeds, ids = self.conditioning(batch)
        pred = self.denoise(model, noisy, t, embeds, ids, batch)
        loss = diffusion_loss(pred, noise_target(latents, noise, t, self.abar, self.prediction_type))
        return loss, {"latents": latents, "noisy": noisy, "t": t, "pred": pred}

    def val_batch(self) -> dict | None:
        """The held-out faces (first ``val_items``, no flip, fixed degradation) with their mean latents."""
        if self._val is None and self.cfg.val_dirs:
            data_cfg = dataclasses.replace(
                self.data_config(self.cfg.val_dirs, False), max_items=self.cfg.val_items
            )
            ds = AuthFaceDataset(data_cfg)
            self._val = collate_faces([ds[i] for i in range(len(ds))], self.device)
            self._val["latents"] = latents_of(self.parts.vae, self._val["hq"], sample=False)
        return self._val

    def fixed_noise_loss(self, model) -> float:
        """Eq. 1 on the held-out faces at VAL_TIMESTEPS with seeded noise (comparable across steps)."""
        val = self.val_batch()
        latents = val["latents"]
        embeds, ids = self.conditioning(val)
        losses = []
        for k, step_t in enumerate(VAL_TIMESTEPS):
            noise = initial_noise(1000 + k, tuple(latents.shape), self.device)
            t = torch.full((latents.shape[0],), step_t, device=self.device, dtype=torch.long)
            with run_autocast(self.amp, self.device):
                pred = self.denoise(model, add_noise(latents, noise, t, self.abar), t, embeds, ids, val)
            target = noise_target(latents, noise, t, self.abar, self.prediction_type)
            losses.append(float(diffusion_loss(pred, target)))
        return sum(losses) / len(losses)

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)
