"""What both VSPBFR trainers share: frozen style codec, loss networks, blind data, validation output.

Images enter the networks in [-1, 1] (the official convention); datasets and grids use [0, 1].
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.arcface_resnet import identity_embedding, identity_loss
from ..models.vspbfr_checkpoints import StyleCodec, load_style_codec
from .datasets import FaceDatasetConfig
from .loop import TrainConfig, TrainTask
from .vspbfr_data import BlindFaceDataset, BlindSettings, stack
from .vspbfr_losses import load_identity_net, load_lpips_net

log = logging.getLogger(__name__)

VAL_CHUNK = 4  # faces per validation forward pass (bounds memory at 512 px)


@dataclasses.dataclass(kw_only=True)
class VSPBFRTaskConfig:
    """Settings both stages share (JSON-able; saved with every checkpoint)."""

    train_dirs: list[str]  # folders of aligned HQ faces (FFHQ framing, like the StyleGAN2 prior)
    style_codec: (
        str  # style_encoder_decoder.pt (official) or its PriorFace safetensors: frozen e4e + StyleGAN2
    )
    val_dirs: list[str] = dataclasses.field(default_factory=list)
    size: int = 512  # face side the stage trains at
    lpips_weight: float = 0.1
    id_weight: float = 0.1
    lpips_linear: str | None = None  # LPIPS v0.1 vgg.pth
    lpips_backbone: str | None = None  # torchvision vgg16-397923af.pth
    arcface: str | None = None  # Arcface.pth (torchvision resnet101, 256-d output)
    allow_random_lpips: bool = False  # tests only: a random VGG when the LPIPS files are missing
    allow_random_identity_net: bool = False  # tests only: a random ResNet-101 when Arcface.pth is missing
    degradation: dict = dataclasses.field(default_factory=dict)  # BlindSettings overrides
    align: str = "none"  # "none": files are aligned already; or a template to re-frame them to
    source_template: str | None = None  # template the files are aligned to (with align)
    landmarks_json: str | None = None  # {file: 5 landmarks} to align with (with align), see datasets.py
    max_train_items: int | None = None
    val_seed: int = 1234  # fixed degradation and noise of the validation faces
    samples: int = 4  # validation faces shown in the sample grid


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] network output -> [0, 1] image (clamped)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def need_file(field: str, path: str | None, what: str) -> Path:
    """The path of a required input file, or FileNotFoundError naming the config field and its content."""
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"task_config.{field} = {path!r} is not a file; expected {what}. Nothing is downloaded."
        )
    return Path(path)


def generator_on(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device`` (validation draws never touch the training RNG streams)."""
    return torch.Generator(device=device).manual_seed(seed)


class VSPBFRTaskBase(TrainTask):
    """Frozen codec + LPIPS/identity networks + blind datasets; subclasses add the model and losses."""

    stage_settings: dict[str, Any] = {}  # BlindSettings defaults of the stage (before cfg.degradation)

    def __init__(self, cfg):
        self.cfg = cfg
        self.codec: StyleCodec | None = None
        self.lpips = self.idnet = None
        self.lpips_real = self.idnet_real = False
        self.device = torch.device("cpu")
        self._val = None

    # -- frozen networks -------------------------------------------------------------------------
    def setup(self, device: torch.device, cfg: TrainConfig) -> None:
        c = self.cfg
        self.device = device
        self.lpips, self.lpips_real = load_lpips_net(
            c.lpips_linear, c.lpips_backbone, c.lpips_weight, c.allow_random_lpips
        )
        self.idnet, self.idnet_real = load_identity_net(c.arcface, c.id_weight, c.allow_random_identity_net)
        self.lpips = self.lpips.to(device) if self.lpips is not None else None
        self.idnet = self.idnet.to(device) if self.idnet is not None else None
        what = "style_encoder_decoder.pt (Hugging Face Wanglong2/VSPBFR) or its PriorFace safetensors"
        codec = load_style_codec(need_file("style_codec", c.style_codec, what), device)
        self.codec = StyleCodec(
            codec.encoder.requires_grad_(False), codec.decoder.requires_grad_(False), codec.opts
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """W+ codes of faces in [-1, 1] (frozen e4e)."""
        with torch.no_grad():
            return self.codec.encoder(images)

    # -- loss terms ------------------------------------------------------------------------------
    def lpips_terms(self, out: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of [-1, 1] images (the net takes [0, 1]; no clamping, as officially)."""
        return self.lpips((out + 1.0) / 2.0, (hq + 1.0) / 2.0)

    def perceptual(self, out: torch.Tensor, hq: torch.Tensor, lpips_sum: bool) -> tuple[torch.Tensor, dict]:
        """Weighted LPIPS + identity terms and their logged values."""
        c = self.cfg
        total, logs = out.new_zeros(()), {}
        if c.lpips_weight > 0:
            d = self.lpips_terms(out, hq)
            term = c.lpips_weight * (d.sum() if lpips_sum else d.mean())
            total, logs["lpips"] = total + term, term.item()
        if c.id_weight > 0:
            term = c.id_weight * identity_loss(self.idnet, out, hq)
            total, logs["id"] = total + term, term.item()
        return total, logs

    # -- data ------------------------------------------------------------------------------------
    def blind_settings(self) -> BlindSettings:
        """The stage's degradation settings with the config's overrides."""
        base = dataclasses.asdict(BlindSettings())
        unknown = sorted(set(self.cfg.degradation) - set(base))
        if unknown:
            raise ValueError(f"unknown degradation settings {unknown}; expected a subset of {sorted(base)}")
        return BlindSettings(**{**base, **self.stage_settings, **self.cfg.degradation})

    def _dataset(self, dirs: list[str], split_seed: int, train: bool) -> BlindFaceDataset:
        c = self.cfg
        settings = self.blind_settings()
        if not train:
            settings = dataclasses.replace(settings, hflip=False)
        return BlindFaceDataset(
            FaceDatasetConfig(
                hq_dirs=list(dirs),
                size=c.size,
                degradation="blind",
                split="all",
                seed=split_seed,
                align=c.align,
                source_template=c.source_template,
                landmarks_json=c.landmarks_json,
                max_items=c.max_train_items if train else None,
            ),
            settings,
        )

    def train_set(self) -> BlindFaceDataset:
        return self._dataset(self.cfg.train_dirs, 0, train=True)

    def val_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fixed validation (LQ, HQ) in [-1, 1] on CPU, or None without val_dirs."""
        if self._val is None and self.cfg.val_dirs:
            ds = self._dataset(self.cfg.val_dirs, self.cfg.val_seed, train=False)
            items = [ds[i] for i in range(len(ds))]
            cpu = torch.device("cpu")
            self._val = (stack(items, "lq", cpu), stack(items, "hq", cpu))
        return self._val

    # -- validation ------------------------------------------------------------------------------
    def image_metrics(self, out: torch.Tensor, hq: torch.Tensor) -> dict[str, float]:
        """PSNR/SSIM, and LPIPS / ArcFace cosine when their real weights are loaded ([-1, 1] inputs)."""
        from ..inference.metrics.psnr_ssim import psnr, ssim

        a, b = to_unit(out).cpu(), to_unit(hq).cpu()
        metrics = {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean())}
        with torch.no_grad():
            if self.lpips_real:
                metrics["lpips"] = float(self.lpips_terms(out.to(self.device), hq.to(self.device)).mean())
            if self.idnet_real:
                ea = identity_embedding(self.idnet, out.to(self.device))
                eb = identity_embedding(self.idnet, hq.to(self.device))
                metrics["id_cos"] = float((ea * eb).sum(1).mean())
        return metrics

    def save_grid(self, columns: dict[str, torch.Tensor], path: Path) -> None:
        """One row per face: the given [-1, 1] columns side by side, labelled once."""
        from ..inference.metrics.grid import make_grid

        names = list(columns)
        size = columns[names[-1]].shape[-1]
        cells = {k: F.interpolate(to_unit(v), size=(size, size), mode="nearest") for k, v in columns.items()}
        n = min(self.cfg.samples, cells[names[0]].shape[0])
        rows = [[cells[k][i] for k in names] for i in range(n)]
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(rows, [" | ".join(names)] + [""] * (n - 1)).save(path)

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)
