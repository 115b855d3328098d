"""AuthFace stage II: a ControlNet on the stage-I SDXL that restores degraded faces, with the facial loss.

The ControlNet is ``ControlNetModel.from_unet(stage-I UNet)`` (encoder copied, zero convolutions
at zero) and is the only generator network that trains; the stage-I UNet, VAE and both text
encoders are frozen on the task. The control image is the degraded face in [0, 1] (GFPGAN-style
blind degradation by default) and the text is the null prompt "" encoded by both encoders (not
zeros: the same as the sampler and ComfyUI's CLIPTextEncode). Micro-conditioning is fixed to the
training size without crop, as at inference.

Loss (AuthFace Eq. 1-4): ``L = L_noise + L_facial`` where L_noise is the usual epsilon MSE and
L_facial (models/authface_facial.py) is the time-weighted eye/mouth loss on the predicted clean
latent: per region an adversarial term (lambda_d) and a Gram-matrix style term (lambda_s) through
that region's latent discriminator. Boxes come from five landmarks of the ground-truth face
(``landmarks_json``, else the alignment template). The discriminators are the loop's auxiliary
network, trained after each generator step on the same batch with their own Adam; during the
generator step they are frozen so that only the ControlNet receives gradients.

``weight_mode`` is AuthFace's Table 2 ablation ("time_aware", "constant", "none"; "none" drops the
facial loss and the discriminators entirely) and ``m``, ``s`` its Table 4 sweep. The run folder
gets ``time_weight.png`` at the start; ``log.csv``/``curves.png`` have one column per loss term.

Export: ``latest.safetensors`` is the ControlNet as one safetensors file in the diffusers key
layout (what ComfyUI's ControlNetLoader detects as a diffusers ControlNet and what
inference/authface_loading.py reads; the config rides in the metadata) and ``latest-diffusers/``
is the same ControlNet as a diffusers folder (config.json + diffusion_pytorch_model.safetensors).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .authface_common import (
    EXPORT_DTYPES,
    AuthFaceTaskBase,
    frozen_dtype,
    sample_images,
    sampling_model,
    unet_kwargs,
)
from .authface_data import AuthFaceDataConfig
from .loop import TrainConfig

log = logging.getLogger(__name__)

ARCHITECTURE = "authface-controlnet"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class AuthFaceStage2Config:
    """Model, data, loss and validation settings of a stage-II run (saved with every checkpoint)."""

    base_model: str  # stage-I SDXL single file (or diffusers folder)
    train_dirs: list[str]  # folders of high-quality aligned faces
    tokenizer_dirs: list[str] | None = None  # CLIP tokenizers (a single file carries none)
    config_root: str | None = None  # diffusers configs for single files without PriorFace metadata
    resolution: int = 1024
    degradation: str = "blind"  # a degradations mode for the control image
    degradation_settings: dict = field(default_factory=dict)  # BlindConfig overrides
    landmarks_json: str | None = None  # {relative name: [[x, y] x5] | null} in file pixels
    landmark_template: str = "ffhq"  # landmarks of faces missing from landmarks_json
    hflip: bool = True
    null_prompt: str = ""
    conditioning_scale: float = 1.0
    lambda_d: float = 1.0  # adversarial weight (GFPGAN's component weight; AuthFace's is unpublished)
    lambda_s: float = 200.0  # style weight (GFPGAN's comp_style_weight)
    weight_mode: str = "time_aware"  # "time_aware", "constant" or "none" (Table 2)
    m: float = -0.5  # logit-normal location (Table 4)
    s: float = 1.0  # logit-normal scale (Table 4)
    regions: str | list[str] = "paired"  # "paired" (eyes, mouth), "separate" or region names
    adv_mode: str = "saturating"  # "saturating" log(1 - D) as the paper, or "non_saturating"
    disc_channels: int = 64
    disc_lr: float = 2e-3  # GFPGAN's component-discriminator Adam
    disc_betas: tuple[float, float] = (0.9, 0.99)
    disc_time_weighted: bool = False  # weight the discriminator loss by w(t) too
    gradient_checkpointing: bool = True
    max_train_items: int | None = None
    data_seed: int = 0
    val_dirs: list[str] = field(default_factory=list)
    val_items: int = 4
    val_seed: int = 1234  # fixed degradation of the validation faces
    validation_steps: int = 30
    export_dtype: str = "fp16"

    def __post_init__(self) -> None:
        from ..models.authface_discriminator import resolve_regions
        from ..models.authface_facial import ADV_MODES, WEIGHT_MODES

        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {self.weight_mode!r}")
        if self.adv_mode not in ADV_MODES:
            raise ValueError(f"adv_mode must be one of {ADV_MODES}, got {self.adv_mode!r}")
        if self.s <= 0:
            raise ValueError(f"s must be positive, got {self.s}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(
                f"export_dtype must be one of {sorted(EXPORT_DTYPES)}, got {self.export_dtype!r}"
            )
        resolve_regions(self.regions if isinstance(self.regions, str) else tuple(self.regions))


class AuthFaceStage2Task(AuthFaceTaskBase):
    """ControlNet training on the frozen stage-I SDXL with L_noise + time-aware facial loss."""

    name = "authface_stage2"

    def __init__(self, cfg: AuthFaceStage2Config):
        super().__init__(cfg)
        self.unet = None
        self.discs = None
        self._null = None
        self._unet_dtype = torch.float32

    # -- model -------------------------------------------------------------------------------
    def setup(self, device: torch.device, cfg: TrainConfig) -> None:
        from ..inference.sd_prompts import encode_prompts

        super().setup(device, cfg)
        self._unet_dtype = frozen_dtype(cfg.precision, device)
        self.unet = self.parts.unet.to(device).requires_grad_(False).eval()
        if self.cfg.gradient_checkpointing:
            # Activations of the frozen UNet are needed for the ControlNet's gradient; recompute them.
            self.unet.enable_gradient_checkpointing()
        with torch.no_grad():
            self._null = encode_prompts(self.parts, [self.cfg.null_prompt])
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if self.cfg.weight_mode == "time_aware":
            from .authface_plots import plot_time_weight

            plot_time_weight(Path(cfg.out_dir) / "time_weight.png", self.cfg.m, self.cfg.s)

    def build_model(self) -> torch.nn.Module:
        from diffusers import ControlNetModel

        if self.unet is None:
            raise RuntimeError("call setup() before build_model()")
        net = ControlNetModel.from_unet(self.unet).float().requires_grad_(True).train()
        if self.cfg.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        # Copied in fp32 above; the frozen UNet may now drop to the run's half precision (CUDA only).
        if self._unet_dtype != torch.float32:
            self.unet.to(self._unet_dtype)
        return net

    def facial_active(self) -> bool:
        """False for the "none" ablation and for zero weights: no facial loss, no discriminators."""
        c = self.cfg
        return c.weight_mode != "none" and (c.lambda_d != 0 or c.lambda_s != 0)

    def build_aux(self) -> torch.nn.Module | None:
        from ..models.authface_discriminator import FacialDiscriminators, default_patch_sizes

        if not self.facial_active():
            return None
        regions = self.cfg.regions if isinstance(self.cfg.regions, str) else tuple(self.cfg.regions)
        sizes = default_patch_sizes(self.cfg.resolution // 8, regions)
        self.discs = FacialDiscriminators(regions, 4, self.cfg.disc_channels, sizes)
        return self.discs

    def aux_optimizer_settings(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"lr": self.cfg.disc_lr, "betas": tuple(self.cfg.disc_betas), "eps": cfg.eps}

    # -- data --------------------------------------------------------------------------------
    def data_config(self, dirs: list[str], train: bool) -> AuthFaceDataConfig:
        c = self.cfg
        return AuthFaceDataConfig(
            dirs=list(dirs),
            resolution=c.resolution,
            seed=c.data_seed if train else c.val_seed,
            captions="none",
            hflip=c.hflip and train,
            landmarks_json=c.landmarks_json,
            landmark_template=c.landmark_template,
            degradation=c.degradation,
            degradation_settings=dict(c.degradation_settings),
            max_items=c.max_train_items if train else None,
        )

    # -- loss ---------------------------------------------------------------------------------
    def conditioning(self, batch: dict):
        import dataclasses

        b = batch["hq"].shape[0]
        null = dataclasses.replace(
            self._null, embeds=self._null.embeds.expand(b, -1, -1), pooled=self._null.pooled.expand(b, -1)
        )
        r = self.cfg.resolution
        ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).expand(b, -1)
        return null, ids

    def denoise(self, model, noisy, t, embeds, ids, batch):
        kwargs = unet_kwargs(embeds, ids)
        down, mid = model(
            noisy,
            t,
            controlnet_cond=batch["lq"],
            conditioning_scale=self.cfg.conditioning_scale,
            return_dict=False,
            **kwargs,
        )
        return self.unet(
            noisy, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs
        ).sample

    def training_loss(self, model, batch, step):
        from ..models.authface_facial import facial_loss, latent_boxes, normalize_timesteps, predict_x0

        l_noise, parts = self.noise_loss(model, batch)
        logs = {"loss_noise": l_noise.item()}
        total = l_noise
        if self.facial_active():
            c = self.cfg
            self.discs.requires_grad_(False)  # generator step: only the ControlNet learns
            t = parts["t"]
            z0_pred = predict_x0(
                parts["noisy"].float(), parts["pred"].float(), self.abar, t, self.prediction_type
            )
            boxes = latent_boxes(batch["boxes"], c.resolution).to(z0_pred.device)
            t_norm = normalize_timesteps(t, self.abar.shape[0])
            l_facial, terms = facial_loss(
                z0_pred, parts["latents"], boxes, t_norm, self.discs,
                lambda_d=c.lambda_d, lambda_s=c.lambda_s, weight_mode=c.weight_mode, m=c.m, s=c.s,
                adv_mode=c.adv_mode,
            )  # fmt: skip
            total = total + l_facial
            logs["loss_facial"] = l_facial.item()
            logs.update(terms)
            # What the discriminator step of this batch needs (the loop hands the same dict back).
            batch["_facial"] = {
                "z0_pred": z0_pred.detach(),
                "z0_hq": parts["latents"],
                "boxes": boxes,
                "t": t_norm,
            }
        else:
            logs["loss_facial"] = 0.0
        logs["loss"] = total.item()
        return total, logs

    def aux_loss(self, model, batch, step):
        from ..models.authface_facial import discriminator_loss, time_weight

        saved = batch.get("_facial")
        if saved is None or self.discs is None:
            return None, {}
        c = self.cfg
        self.discs.requires_grad_(True)
        weight = time_weight(saved["t"], c.weight_mode, c.m, c.s) if c.disc_time_weighted else None
        loss, terms = discriminator_loss(saved["z0_pred"], saved["z0_hq"], saved["boxes"], self.discs, weight)
        return loss, {"loss_disc": loss.item(), **terms}

    # -- validation ---------------------------------------------------------------------------
    def validate(self, model, step, out_dir: Path) -> dict[str, float]:
        from ..inference.authface_sampler import AuthFaceSettings
        from ..inference.metrics.grid import make_grid
        from ..inference.metrics.psnr_ssim import psnr, ssim

        val = self.val_batch()
        if val is None:
            return {}
        metrics = {"loss_fixed": self.fixed_noise_loss(model)}
        settings = AuthFaceSettings(
            steps=self.cfg.validation_steps,
            prompt=self.cfg.null_prompt,
            negative_prompt=self.cfg.null_prompt,
            control_strength=self.cfg.conditioning_scale,
            seed=0,
            color_fix="none",
        )
        net = sampling_model(self.parts, self.unet, model)
        out = sample_images(net, val["lq"], [settings] * val["lq"].shape[0], self.amp)
        hq, lq = val["hq"].cpu(), val["lq"].cpu()
        metrics.update(psnr=float(psnr(out, hq).mean()), ssim=float(ssim(out, hq).mean()))
        metrics.update(psnr_lq=float(psnr(lq, hq).mean()))
        rows = [[lq[i], out[i], hq[i]] for i in range(out.shape[0])]
        labels = ["degraded | AuthFace | ground truth"] + [""] * (len(rows) - 1)
        path = Path(out_dir) / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(rows, labels, max_cell=512).save(path)
        return metrics

    # -- export -------------------------------------------------------------------------------
    def controlnet_tensors(self, model) -> dict[str, torch.Tensor]:
        """The ControlNet's state dict on CPU in the export dtype, diffusers key names unchanged."""
        dtype = EXPORT_DTYPES[self.cfg.export_dtype]
        return {
            k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in model.state_dict().items()
        }

    def export(self, model, path: Path, step: int) -> None:
        from ..models.checkpoint import save_safetensors

        path = Path(path)
        tensors = self.controlnet_tensors(model)
        config = json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))
        meta = {
            "priorface.step": str(step),
            "priorface.task": json.dumps(asdict(self.cfg)),
            "priorface.null_prompt": self.cfg.null_prompt,
            "priorface.time_ids": "target size, no crop",
        }
        save_safetensors(tensors, path, ARCHITECTURE, config, extra_metadata=meta)
        write_diffusers_folder(model, tensors, path.parent / f"{path.stem}-diffusers")


def write_diffusers_folder(model, tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, swapped in whole (a crash keeps the old folder)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_config(str(tmp))
    save_file(tensors, str(tmp / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
