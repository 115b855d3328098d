"""AuthFace stage I: fine-tune the whole SDXL UNet on high-quality photographic faces.

AuthFace (arXiv 2410.09864) first fine-tunes SDXL text-to-image on >8K photographer portraits with
photography-guided tag captions (lr 5e-7, 1024 px), so that the prior already draws authentic
skin and eye detail before the restoration ControlNet (stage II, training/authface_stage2.py) is
trained on top. The loss is SDXL's own: epsilon prediction with MSE, both text encoders and the
micro-conditioning (original size, crop, target size). VAE and text encoders are frozen and kept
on the task; only the UNet trains.

Validation draws text-to-image samples with fixed prompts and seeds through the user-facing
sampler (inference/authface_sampler.py, DDIM, no ControlNet), one grid row per prompt and one
column per seed, and, when ``val_dirs`` are given, the denoising loss of the held-out faces at
fixed timesteps and noise (``val_loss_fixed``, comparable across steps).
Export writes the whole fine-tuned model as one SDXL single-file checkpoint (the
``CheckpointLoaderSimple`` layout) via inference/sd_checkpoints.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..inference.priors.captions import NO_LABEL_CAPTION
from .authface_common import (
    EXPORT_DTYPES,
    AuthFaceTaskBase,
    sample_images,
    sampling_model,
    time_ids,
    unet_kwargs,
)
from .authface_data import AuthFaceDataConfig, collate_faces

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "close-up portrait of a young woman, soft natural light, sharp focus, shallow depth of field",
    "headshot of an elderly man with a grey beard, studio lighting, sharp focus",
]


@dataclass
class AuthFaceStage1Config:
    """Model, data and validation settings of a stage-I run (saved with every checkpoint)."""

    base_model: str  # SDXL single file (.safetensors) or diffusers folder
    train_dirs: list[str]  # folders of high-quality face photos
    tokenizer_dirs: list[str] | None = None  # CLIP tokenizers when a single file carries none
    config_root: str | None = None  # diffusers configs for single files (default: shipped SDXL configs)
    resolution: int = 1024  # training side (paper: 1024)
    captions: str = "txt"  # "txt" (beside images), "json", "template" or "authface_tags" (see authface_data)
    captions_file: str | None = None  # JSON {relative name: caption} for "json" / "authface_tags"
    caption_fallback: str | None = None  # caption where none is found (None: missing is an error)
    caption_dropout: float = 0.0  # share of captions replaced by "" (keeps unconditional guidance trained)
    hflip: bool = True
    gradient_checkpointing: bool = True
    max_train_items: int | None = None
    data_seed: int = 0  # seeds flips (and the split hash)
    val_dirs: list[str] = field(default_factory=list)  # held-out faces for the fixed-noise loss
    val_items: int = 8
    validation_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_steps: int = 30  # DDIM steps per sample
    guidance_scale: float = 5.0
    negative_prompt: str = ""  # encoded as text, "" included (as ComfyUI's CLIPTextEncode and our sampler do)
    export_dtype: str = "fp16"  # dtype of the exported single file

    def __post_init__(self) -> None:
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(
                f"export_dtype must be one of {sorted(EXPORT_DTYPES)}, got {self.export_dtype!r}"
            )
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if len(self.validation_seeds) == 0 and self.validation_prompts:
            raise ValueError("validation_prompts need at least one validation seed")


def encode_texts(parts, prompts: list[str]):
    """Prompt embeddings of both SDXL text encoders, without gradient."""
    from ..inference.sd_prompts import encode_prompts

    with torch.no_grad():
        return encode_prompts(parts, prompts)


class AuthFaceStage1Task(AuthFaceTaskBase):
    """Full-UNet SDXL fine-tune on face photos with frozen VAE and text encoders."""

    name = "authface_stage1"

    def build_model(self) -> torch.nn.Module:
        if self.parts is None:
            raise RuntimeError("call setup() before build_model()")
        unet = self.parts.unet.float().requires_grad_(True).train()
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet

    def data_config(self, dirs: list[str], train: bool) -> AuthFaceDataConfig:
        c = self.cfg
        return AuthFaceDataConfig(
            dirs=list(dirs),
            resolution=c.resolution,
            seed=c.data_seed,
            captions=c.captions,
            captions_file=c.captions_file,
            # Held-out faces need not be in the captions file: they only measure the denoising loss.
            caption_fallback=c.caption_fallback if train else (c.caption_fallback or NO_LABEL_CAPTION),
            hflip=c.hflip and train,
            max_items=c.max_train_items if train else None,
        )

    def collate(self, items: list[dict], device: torch.device) -> dict:
        batch = collate_faces(items, device)
        if self.cfg.caption_dropout > 0:
            # Global CPU generator: restored on resume, so the same captions drop.
            drop = torch.rand(len(items)) < self.cfg.caption_dropout
            batch["captions"] = [
                "" if d else c for d, c in zip(drop.tolist(), batch["captions"], strict=True)
            ]
        return batch

    def conditioning(self, batch: dict):
        res = (self.cfg.resolution, self.cfg.resolution)
        ids = time_ids(batch["original_size"], batch["crop_top_left"], res, self.device)
        return encode_texts(self.parts, batch["captions"]), ids

    def denoise(self, model, noisy, t, embeds, ids, batch):
        return model(noisy, t, **unet_kwargs(embeds, ids)).sample

    def training_loss(self, model, batch, step):
        loss, _ = self.noise_loss(model, batch)
        return loss, {"loss": loss.item()}

    def validate(self, model, step, out_dir: Path) -> dict[str, float]:
        metrics = {}
        if self.cfg.val_dirs:
            metrics["loss_fixed"] = self.fixed_noise_loss(model)
        if self.cfg.validation_prompts:
            grid = self.sample_grid(model)
            path = Path(out_dir) / "samples" / f"step_{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
        return metrics

    def sample_grid(self, model):
        """Text-to-image samples, one row per validation prompt and one column per seed."""
        from ..inference.authface_sampler import AuthFaceSettings
        from ..inference.metrics.grid import make_grid

        c = self.cfg
        settings = [
            AuthFaceSettings(
                steps=c.validation_steps,
                guidance=c.guidance_scale,
                prompt=prompt,
                negative_prompt=c.negative_prompt,
                seed=seed,
                color_fix="none",
            )
            for prompt in c.validation_prompts
            for seed in c.validation_seeds
        ]
        # The sampler takes its shapes from a control image; without a ControlNet it is never read.
        blank = torch.zeros(len(settings), 3, c.resolution, c.resolution, device=self.device)
        images = sample_images(sampling_model(self.parts, model), blank, settings, self.amp)
        cols = len(c.validation_seeds)
        rows = [list(images[r * cols : (r + 1) * cols]) for r in range(len(c.validation_prompts))]
        labels = [f"{p}  (seeds {', '.join(map(str, c.validation_seeds))})" for p in c.validation_prompts]
        return make_grid(rows, labels, max_cell=512)

    # -- export -------------------------------------------------------------------------------
    def export(self, model, path: Path, step: int) -> None:
        from ..inference.sd_checkpoints import export_single_file

        dtype = EXPORT_DTYPES[self.cfg.export_dtype]
        export_single_file(dataclasses.replace(self.parts, unet=model), Path(path), dtype=dtype)
        meta = {"task": self.name, "step": step, "config": asdict(self.cfg)}
        Path(path).with_suffix(".json").write_text(json.dumps(meta, indent=1))
