"""Training XPSR (Qu et al., ECCV 2024) on faces with the generic loop: data, frozen SD, loss, validation, export.

Recipe of the official code (qyp2000/XPSR train.py, papers.md section 3.6): SD1.5 UNet body, VAE and
CLIP text encoder frozen; the whole ControlNet (with Semantic-Fusion Attention and the DFC heads) and
the UNet's PASD pixel attentions train (exactly :func:`freeze_for_xpsr_training`). Loss: MSE between
the UNet's prediction and the noise (or velocity, if the scheduler config says v-prediction) at a
uniform DDPM timestep, plus ``dfc_weight`` x the Degradation-Free Constraint (models/xpsr_dfc.py).
The high-level prompt feeds the UNet and the ControlNet's SD attention, the low-level prompt the
ControlNet's SFA low-level branch. The control image is the LR face bicubic-upsampled to ``size``,
in [0, 1]; latents are ``VAE(HR)`` samples x 0.18215.

What the loop optimises is :class:`XPSRTrainable` (the ControlNet + the UNet's pixel attentions), so
the training state holds no frozen weights; the frozen UNet lives on the task and the pixel
attentions of whichever model is run (trained or EMA) are plugged into it before each use.

Every random draw of a step (VAE posterior sample, noise, timesteps) comes from torch's global CPU
generator, which the loop saves and restores, so a resumed run repeats an uninterrupted one on any
device. Validation samples with inference/xpsr_sampler.py (its own seeded generator) and writes
``samples/step_XXXXXX.png`` (LR | XPSR | HR) with PSNR and, when its weights are installed, LPIPS.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.xpsr_attention import check_sfa_mode
from ..models.xpsr_dfc import DFC_MODES, DFC_WEIGHT, dfc_loss
from .datasets import FaceDataset, FaceDatasetConfig
from .loop import TrainTask, autocast_dtype
from .xpsr_data import PromptLookup, XPSRPairs

log = logging.getLogger(__name__)

TextEncoder = Callable[[list[str]], torch.Tensor]  # texts -> (N, T, D) token embeddings
_TEXT_CACHE = 64  # encoded texts kept (fixed prompts repeat every step; per-face texts rarely do)


@dataclass
class XPSRTaskConfig:
    """Model, data and prompt settings of an XPSR run (plain JSON values; saved with every checkpoint)."""

    base_model: (
        str  # SD1.5 single-file checkpoint or diffusers folder: UNet body, VAE, text encoder, scheduler
    )
    train_dirs: list[str]  # folders of aligned HQ faces
    val_dirs: list[str] = field(default_factory=list)
    xpsr_init: str | None = None  # checkpoint folder (unet/ + controlnet/) to start from, else init from SD
    tokenizer_dirs: list[str] = field(default_factory=list)  # for single-file checkpoints (load_sd_parts)
    config_root: str | None = None  # diffusers config folders for single-file checkpoints (load_sd_parts)
    size: int = 512  # HR side; the control image is the LR upsampled to this size
    degradation: str = "realesrgan"  # a degradations mode, or "precomputed" (pairs from lq_dir)
    lq_dir: str | None = None  # precomputed LR faces matched by relative stem
    hflip: bool = True  # official: random horizontal flip
    max_train_items: int | None = None
    high_prompts: str | None = None  # folder of <stem>.txt or prior files (prompt_high); None: high_prompt
    low_prompts: str | None = None  # folder of <stem>.txt or prior files (prompt_low); None: low_prompt
    high_prompt: str = ""  # fixed high-level text (every face, or those without a file when not required)
    low_prompt: str = ""  # fixed low-level text
    prompts_required: bool = True  # a training face without its text file is an error
    hq_control_ratio: float = 0.0  # official 0.1: control = HR face, low prompt = HR's description
    hq_low_prompts: str | None = (
        None  # folder of the HR faces' low-level texts (official lowlevel_prompt_q_GT)
    )
    hq_low_prompt: str = ""  # fixed low-level text of HR controls without a file
    empty_high_prompt_like_official_release: bool = (
        False  # reproduce the release's "" high prompt in training
    )
    sfa_mode: str = "parallel"  # models/xpsr_attention.SFA_MODES
    dfc_mode: str = "official"  # "official" (3 pixel + 12 + mid latent heads) or "paper" (3 + 3)
    dfc_weight: float = DFC_WEIGHT
    conditioning_scale: float = 1.0
    gradient_checkpointing: bool = False  # recompute transformer activations in backward (less memory)
    val_items: int = 4
    val_seed: int = 1234  # fixed degradation and sampling noise of the validation faces
    val_steps: int = 20  # DDPM steps of the validation sampling (official repo: 20)
    val_guidance: float = 4.5  # CFG of the validation sampling (official repo: 4.5)
    export_dtype: str = "fp32"  # dtype of the exported folder ("fp32", "fp16", "bf16")


class XPSRTrainable(nn.Module):
    """What trains: the XPSR ControlNet and the UNet's pixel attentions (one ModuleList per up block)."""

    def __init__(self, controlnet: nn.Module, pixel_attentions: list[nn.ModuleList]):
        super().__init__()
        self.controlnet = controlnet
        self.pixel_attentions = nn.ModuleList(pixel_attentions)


def clip_text_encoder(tokenizer, text_encoder) -> TextEncoder:
    """The official XPSR text encoding: 77 tokens (padded, truncated), last hidden state."""

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(
            list(texts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return text_encoder(ids.to(text_encoder.device))[0]

    return encode


def _check_config(cfg: XPSRTaskConfig) -> None:
    check_sfa_mode(cfg.sfa_mode)
    if cfg.dfc_mode not in DFC_MODES:
        raise ValueError(f"dfc_mode must be one of {DFC_MODES}, got {cfg.dfc_mode!r}")
    if cfg.dfc_weight < 0:
        raise ValueError(f"dfc_weight must be >= 0, got {cfg.dfc_weight}")
    if cfg.size <= 0 or cfg.size % 64:
        raise ValueError(f"size must be a positive multiple of 64 (8x VAE, 8x UNet), got {cfg.size}")
    if not cfg.train_dirs:
        raise ValueError("train_dirs is empty; expected at least one folder of HQ faces")


class XPSRTask(TrainTask):
    """XPSR ControlNet + pixel-attention training on face folders.

    ``parts`` replaces loading ``base_model``: an object with the fields of inference/sd_checkpoints.py
    ``SDParts`` (``unet``, ``vae``, ``text_encoders``, ``tokenizers``, ``scheduler_config``) or a
    zero-argument callable returning one (tests pass tiny models). ``encode_text`` replaces the text
    encoding (texts -> (N, T, D)); by default loaded parts use inference/sd_prompts.py and given parts
    the official 77-token CLIP encoding.
    """

    name = "xpsr"

    def __init__(self, cfg: XPSRTaskConfig, parts: Any = None, encode_text: TextEncoder | None = None):
        _check_config(cfg)
        self.cfg = cfg
        self._parts_arg, self._encode_arg = parts, encode_text
        self._text_cache: dict[str, torch.Tensor] = {}
        self._val = None
        self._lpips = None
        self.device = torch.device("cpu")
        self.amp: torch.dtype | None = None

    # -- frozen networks and the trained model ----------------------------------------------
    def _load_parts(self):
        if self._parts_arg is not None:
            parts = self._parts_arg() if callable(self._parts_arg) else self._parts_arg
            encode = self._encode_arg or clip_text_encoder(parts.tokenizers[0], parts.text_encoders[0])
            return parts, encode
        from ..inference.sd_checkpoints import load_sd_parts
        from ..inference.sd_prompts import encode_prompts

        parts = load_sd_parts(
            self.cfg.base_model,
            family="sd15",  # XPSR's ControlNet and pixel attentions are SD1.5-shaped
            tokenizer_dirs=self.cfg.tokenizer_dirs or None,
            dtype=torch.float32,
            config_root=self.cfg.config_root,
        )
        # The text closure must not keep the SD UNet alive (setup replaces it by the XPSR UNet).
        text_parts = dataclasses.replace(parts, unet=None)
        return parts, self._encode_arg or (lambda texts: encode_prompts(text_parts, list(texts)).embeds)

    def setup(self, device: torch.device, cfg) -> None:
        """Load SD (or the XPSR init folder), freeze it, and keep VAE, text encoder, UNet on ``device``."""
        from ..inference.xpsr_sampler import make_scheduler
        from ..models.xpsr_unet import xpsr_unet_from_sd

        self.device, self.amp = device, autocast_dtype(cfg, device)
        parts, self._encode = self._load_parts()
        self.scheduler_config = dict(parts.scheduler_config or {})
        self.scheduler = make_scheduler(self.scheduler_config)
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"scheduler prediction_type must be 'epsilon' or 'v_prediction', got {self.scheduler.config.prediction_type!r}"
            )
        self.vae = parts.vae.to(device).eval().requires_grad_(False)
        self.text_encoder = parts.text_encoders[0].to(device).eval().requires_grad_(False)
        self._init_controlnet = None
        if self.cfg.xpsr_init:
            from ..models.xpsr_checkpoints import load_xpsr_checkpoint

            self.unet, self._init_controlnet = load_xpsr_checkpoint(self.cfg.xpsr_init)
        else:
            self.unet = xpsr_unet_from_sd(parts.unet)  # pixel attentions: random init, as official
        self.unet = self.unet.to(device).eval()
        self._text_cache.clear()

    def build_model(self) -> XPSRTrainable:
        """ControlNet from the SD UNet (official ``from_unet`` copy) or the init folder, plus pixel attentions."""
        from ..models.xpsr_controlnet import xpsr_controlnet_class
        from ..models.xpsr_unet import freeze_for_xpsr_training

        controlnet = self._init_controlnet or xpsr_controlnet_class().from_unet(self.unet)
        controlnet = controlnet.to(self.device).train()
        trainable = freeze_for_xpsr_training(self.unet, controlnet)
        if self.cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            controlnet.enable_gradient_checkpointing()
        model = XPSRTrainable(controlnet, [block.pixel_attentions for block in self.unet.up_blocks])
        if {id(p) for p in model.parameters()} != {id(p) for p in trainable}:
            raise RuntimeError("XPSRTrainable does not hold exactly the parameters XPSR trains")
        return model

    def bind(self, model: XPSRTrainable) -> None:
        """Plug ``model``'s pixel attentions into the frozen UNet (the trained or the EMA copy)."""
        for block, attentions in zip(self.unet.up_blocks, model.pixel_attentions, strict=True):
            block.pixel_attentions = attentions

    def trained_unet(self, model: XPSRTrainable) -> nn.Module:
        """The full XPSR UNet carrying ``model``'s pixel attentions."""
        self.bind(model)
        return self.unet

    # -- data --------------------------------------------------------------------------------
    def _pairs(self, dirs, degradation, seed, max_items, train: bool) -> XPSRPairs:
        """Faces with prompts; ``train`` turns on flips, HR substitution and required prompt files."""
        cfg = self.cfg
        required = cfg.prompts_required if train else False
        faces = FaceDataset(
            FaceDatasetConfig(
                hq_dirs=list(dirs),
                size=cfg.size,
                degradation=degradation,
                lq_dir=cfg.lq_dir if degradation == "precomputed" else None,
                split="train" if train else "all",  # "train" is the split FaceDataset flips
                val_fraction=0.0,  # validation faces come from val_dirs, not from a hash split
                seed=seed,
                hflip=cfg.hflip and train,
                max_items=max_items,
            )
        )
        return XPSRPairs(
            faces,
            PromptLookup(cfg.high_prompts, "prompt_high", cfg.high_prompt, required),
            PromptLookup(cfg.low_prompts, "prompt_low", cfg.low_prompt, required),
            PromptLookup(cfg.hq_low_prompts, "prompt_low", cfg.hq_low_prompt, required),
            cfg.hq_control_ratio if train else 0.0,
        )

    def train_set(self) -> XPSRPairs:
        cfg = self.cfg
        return self._pairs(cfg.train_dirs, cfg.degradation, 0, cfg.max_train_items, train=True)

    def collate(self, items: list[dict], device: torch.device) -> dict:
        high = [it["prompt_high"] for it in items]
        if self.cfg.empty_high_prompt_like_official_release:
            high = [""] * len(items)  # the release tokenises "" for every sample (papers.md 3.6)
        return {
            "hq": torch.stack([it["hq"] for it in items]).to(device),
            "lq": torch.stack([it["lq"] for it in items]).to(device),
            "prompt_high": high,
            "prompt_low": [it["prompt_low"] for it in items],
            "names": [it["name"] for it in items],
        }

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Token embeddings (N, T, D) of ``texts`` with the frozen text encoder (small cache)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            # Always full precision: a cached text must not depend on whether training (autocast)
            # or validation encoded it first, or resumed runs would drift on GPU.
            with torch.autocast(self.device.type, enabled=False):
                embeds = self._encode(missing)
            for text, emb in zip(missing, embeds, strict=True):
                if len(self._text_cache) >= _TEXT_CACHE:
                    self._text_cache.pop(next(iter(self._text_cache)))
                self._text_cache[text] = emb.float()
        return torch.stack([self._text_cache[t] for t in texts]).to(self.device)

    # -- loss --------------------------------------------------------------------------------
    def training_loss(self, model: XPSRTrainable, batch: dict, step: int):
        from ..inference.xpsr_vae import encode_latents
        from ..models.xpsr_unet import unet_forward

        cfg = self.cfg
        unet = self.trained_unet(model)
        hq, lq = batch["hq"], batch["lq"]
        with torch.no_grad():
            latents = encode_latents(self.vae, hq, None)  # posterior sample, global CPU generator
            high, low = self.encode(batch["prompt_high"]), self.encode(batch["prompt_low"])
        b = latents.shape[0]
        noise = torch.randn(latents.shape).to(latents.device)  # CPU draws: resumable on any device
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,)).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        res = model.controlnet(
            noisy, t, high, lq, lowlevel_encoder_hidden_states=low,
            conditioning_scale=cfg.conditioning_scale, sfa_mode=cfg.sfa_mode,
        )  # fmt: skip
        pred = unet_forward(unet, noisy, t, high, res.down_block_res_samples, res.mid_block_res_sample)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        mse = F.mse_loss(pred.float(), target.float())
        dfc = dfc_loss(
            res.rgbs,
            res.latent_preds,
            res.latent_pred_mid,
            hq * 2.0 - 1.0,
            latents,
            cfg.dfc_mode,
            cfg.dfc_weight,
        )
        loss = mse + dfc.total
        logs = {
            "loss": loss.item(),
            "mse": mse.item(),
            "dfc": dfc.total.item(),
            "dfc_pixel": float(sum(x.item() for x in dfc.pixel_terms)),
            "dfc_latent": float(sum(x.item() for x in dfc.latent_terms)),
        }
        return loss, logs

    # -- validation, export --------------------------------------------------------------------
    def _val_batch(self) -> dict | None:
        if self._val is None and self.cfg.val_dirs:
            cfg = self.cfg
            # Precomputed pairs exist for the training faces only: validation degrades on the fly.
            degradation = "realesrgan" if cfg.degradation == "precomputed" else cfg.degradation
            pairs = self._pairs(cfg.val_dirs, degradation, cfg.val_seed, cfg.val_items, train=False)
            self._val = self.collate([pairs[i] for i in range(len(pairs))], torch.device("cpu"))
        return self._val

    def _conditionings(self, val: dict) -> list:
        from ..inference.xpsr_prompts import (
            ADDED_PROMPT,
            LOWLEVEL_NEGATIVE_PROMPT,
            NEGATIVE_PROMPT,
            XPSRConditioning,
            join_prompt,
        )

        negatives = self.encode([NEGATIVE_PROMPT, LOWLEVEL_NEGATIVE_PROMPT])
        conds = []
        for high, low in zip(val["prompt_high"], val["prompt_low"], strict=True):
            # Official inference: caption + added prompt, whatever the training fed.
            pos = self.encode([join_prompt(high, ADDED_PROMPT), low])
            conds.append(XPSRConditioning(pos[:1], pos[1:], negatives[:1], negatives[1:]))
        return conds

    def sample(self, model: XPSRTrainable, lq: torch.Tensor, conds: list) -> torch.Tensor:
        """XPSR outputs for control images ``lq`` (already at ``size``), with the validation settings."""
        import contextlib

        from ..inference.xpsr_sampler import SamplerSettings, XPSRDenoiser, XPSRPipeline, xpsr_upscale

        cfg = self.cfg
        unet = self.trained_unet(model)
        pipe = XPSRPipeline(unet, model.controlnet, self.vae, self.scheduler_config)
        settings = SamplerSettings(
            steps=cfg.val_steps, guidance=cfg.val_guidance, seed=cfg.val_seed, upscale=1.0,
            process_size=0, latent_tile=0, vae_encode_tile=0, vae_decode_tile=0,
            conditioning_scale=cfg.conditioning_scale,
        )  # fmt: skip
        denoiser = XPSRDenoiser(unet, model.controlnet, cfg.conditioning_scale, cfg.sfa_mode)
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with amp:
            return xpsr_upscale(pipe, lq, conds, settings, model=denoiser).float()

    def validate(self, model: XPSRTrainable, step: int, out_dir: Path) -> dict[str, float]:
        from ..inference.metrics.psnr_ssim import psnr

        val = self._val_batch()
        if val is None:
            return {}
        out = self.sample(model, val["lq"].to(self.device), self._conditionings(val)).cpu()
        hq, lq = val["hq"], val["lq"]
        metrics = {"psnr": float(psnr(out, hq).mean()), "psnr_lr": float(psnr(lq, hq).mean())}
        lpips_model = self._lpips_model()
        if lpips_model is not None:
            from ..inference.metrics.lpips import lpips_distance

            metrics["lpips"] = sum(lpips_distance(lpips_model, out, hq)) / out.shape[0]
            metrics["lpips_lr"] = sum(lpips_distance(lpips_model, lq, hq)) / out.shape[0]
        self._save_grid(lq, out, hq, out_dir / "samples" / f"step_{step:06d}.png")
        return metrics

    def _lpips_model(self):
        if self._lpips is None:
            from ..inference.metrics.lpips import LPIPSWeightsMissing, load_lpips
            from ..inference.model_files import headless_locator

            try:
                self._lpips = load_lpips(headless_locator())
            except LPIPSWeightsMissing as e:
                log.info("validation without LPIPS: %s", e)
                self._lpips = False
        return self._lpips or None

    def _save_grid(self, lq, out, hq, path: Path) -> None:
        from ..inference.metrics.grid import make_grid

        rows = [[lq[i], out[i], hq[i]] for i in range(out.shape[0])]
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(rows, ["LR (bicubic) | XPSR | HR"] + [""] * (len(rows) - 1)).save(path)

    def export(self, model: XPSRTrainable, path: Path, step: int) -> None:
        """Official folder (``unet/``, ``controlnet/``); the loop's ``latest.safetensors`` becomes ``latest/``."""
        from .xpsr_export import export_xpsr_folder

        folder = path.with_suffix("") if path.suffix == ".safetensors" else path
        info = {"step": step, "task": self.name, "task_config": asdict(self.cfg)}
        export_xpsr_folder(self.trained_unet(model), model.controlnet, folder, self.cfg.export_dtype, info)

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)
