"""LLV-FSR (Wang, An, Jiang, Liu, Jiang; arXiv 2411.09293) as plain torch, with its ablations.

Network: conv feature extractor -> L x (LVPFB -> basic block of two transformer blocks) -> conv
-> reconstructor, plus a global residual from the bicubic-upsampled LR image. The priors (semantic
mask, depth, caption and description text embeddings) are encoded once at the working resolution
and fed to every LVPFB. See models/llvfsr_blocks.py for the blocks and the readings of the paper.

- ``upsample="pre_bicubic"``: ``lr`` is already bicubic-upsampled to the output size (the first
  author's SFMNet convention) and the network runs at that size. ``"pixelshuffle"``: the network
  runs at the LR size and the reconstructor upsamples with x2 sub-pixel stages (much cheaper).
- ``variant``: ``"full"`` (LVPFB), ``"model2"`` (priors concatenated, then convs), ``"model1"``
  (no priors at all); ``disabled_priors`` removes single branches (paper Fig. 9).
- Every prior is optional at run time; with ``prior_dropout`` p, training drops each prior per
  sample with probability p, so one model serves any subset.
- The output is not clamped (losses see the raw values); clamp at inference.
- Two speed options, both off by default so older weights rebuild unchanged, chosen by
  measurement (``python scripts/bench_llvfsr_arch.py``: equal wall time, one CPU thread, FFHQ dev
  gain over bicubic): ``rgb_last_stage`` removes the reconstructor's convs at the two largest
  sizes, which took about half of a training step at x8 (step time 0.73 -> 0.49 s); ``block_conv``
  closes each basic block with a residual 3x3 conv as SwinIR does. In 10 minutes: +0.86 dB
  without either, +0.90 with ``block_conv``, +1.05 with both; a plain conv network without
  attention or priors reached +1.20, so the transformer body still learns slower per CPU second.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weights, read_checkpoint, save_safetensors
from .llvfsr_blocks import (
    DESA_MODES,
    LVPFB,
    PRIOR_NAMES,
    TEXT_PRIORS,
    BasicBlock,
    ConcatFusion,
    EncodedPriors,
    SpatialPriorEncoder,
    TextFeatures,
    TextProjector,
)

logger = logging.getLogger(__name__)

ARCHITECTURE = "llvfsr"
TRAINED_WITH_KEY = "priorface.trained_with"
VARIANTS = ("full", "model1", "model2")
UPSAMPLERS = ("pre_bicubic", "pixelshuffle")
SCALES = (2, 4, 8, 16)


@dataclass(frozen=True)
class LLVFSRConfig:
    """Hyperparameters of an LLV-FSR network; stored in every checkpoint to rebuild it."""

    scale: int = 8  # output size / LR size
    width: int = 64  # feature channels C
    depth: int = 6  # number L of (LVPFB -> basic block) stages
    heads: int = 4  # attention heads (window attention and DesA); must divide width
    window: int = 8  # attention window side in pixels of the working resolution
    mlp_ratio: float = 2.0  # hidden width of the feed-forward nets, relative to C
    text_dim: int = 384  # width D of the text embeddings (MiniLM 384, CLIP 512/768)
    mask_classes: int = 7  # channels K of the one-hot mask; must match the mask extractor
    upsample: str = "pixelshuffle"  # "pixelshuffle" (runs at LR size) or "pre_bicubic" (runs at HR size)
    upsampler_width: int = 32  # channels of the sub-pixel upsampling stages (pixelshuffle only)
    block_conv: bool = False  # close each basic block with a residual 3x3 conv (SwinIR-style)
    # pixelshuffle only: the last x2 stage predicts the RGB sub-pixels directly (conv -> 12 channels,
    # shuffle) instead of convolving features at output size; ~3x cheaper, the upsampler's main cost
    rgb_last_stage: bool = False
    variant: str = "full"  # "full" (LVPFB), "model2" (concatenation), "model1" (no priors)
    desa_mode: str = "text_query"  # DesA reading, see llvfsr_blocks.DescriptionAttention
    disabled_priors: tuple[str, ...] = ()  # prior branches not built (paper Fig. 9)
    prior_dropout: float = 0.0  # per-sample probability of dropping each prior while training
    text_pool: str = "mean"  # CapA/model2 text vector: "mean" of real tokens, or the encoder's "pooled"
    mask_resize: str = "nearest"  # how the one-hot mask is resized: "nearest" or "area" (soft fractions)

    def __post_init__(self):
        object.__setattr__(self, "disabled_priors", tuple(sorted(set(self.disabled_priors))))
        choices = {
            "variant": VARIANTS,
            "upsample": UPSAMPLERS,
            "desa_mode": DESA_MODES,
            "text_pool": ("mean", "pooled"),
            "mask_resize": ("nearest", "area"),
            "scale": SCALES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LLVFSRConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        unknown = set(self.disabled_priors) - set(PRIOR_NAMES)
        if unknown:
            raise ValueError(f"disabled_priors has unknown names {sorted(unknown)}; expected {PRIOR_NAMES}")
        for name in ("width", "depth", "heads", "window", "text_dim", "mask_classes", "upsampler_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LLVFSRConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.prior_dropout < 1.0:
            raise ValueError(f"prior_dropout must be in [0, 1), got {self.prior_dropout}")

    @property
    def enabled_priors(self) -> tuple[str, ...]:
        """Priors this network has branches for (none for model1)."""
        if self.variant == "model1":
            return ()
        return tuple(p for p in PRIOR_NAMES if p not in self.disabled_priors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["disabled_priors"] = list(self.disabled_priors)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLVFSRConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown LLV-FSR config keys {extra}; expected a subset of {sorted(known)}")
        return cls(**{**d, "disabled_priors": tuple(d.get("disabled_priors", ()))})


PRESETS: dict[str, LLVFSRConfig] = {
    # CPU-trainable: 16x16 -> 128x128 (x8), network at LR size, MiniLM text embeddings, both speed
    # options on (the dataclass defaults stay off so files written before them rebuild unchanged).
    "small": LLVFSRConfig(block_conv=True, rgb_last_stage=True),
    # Paper-like: L = 7, wider, runs at HR size on the bicubic-upsampled LR, CLIP ViT-B text width.
    "paper": LLVFSRConfig(width=96, depth=7, heads=6, window=8, upsample="pre_bicubic", text_dim=512),
}


def llvfsr_config(preset: str = "small", **overrides) -> LLVFSRConfig:
    """A named preset (``small`` or ``paper``) with some fields replaced."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LLV-FSR preset {preset!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


class Reconstructor(nn.Module):
    """Features -> RGB residual at output size: convs (pre_bicubic) or x2 pixel-shuffle stages."""

    def __init__(self, cfg: LLVFSRConfig):
        super().__init__()
        c, u = cfg.width, cfg.upsampler_width
        if cfg.upsample == "pre_bicubic":
            layers = [nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2, True), nn.Conv2d(c, 3, 3, padding=1)]
        else:
            layers = [nn.Conv2d(c, u, 3, padding=1), nn.LeakyReLU(0.2, True)]
            stages = int(math.log2(cfg.scale)) - (1 if cfg.rgb_last_stage else 0)
            for _ in range(stages):
                layers += [nn.Conv2d(u, u * 4, 3, padding=1), nn.PixelShuffle(2), nn.LeakyReLU(0.2, True)]
            if cfg.rgb_last_stage:
                layers += [nn.Conv2d(u, 3 * 4, 3, padding=1), nn.PixelShuffle(2)]
            else:
                layers.append(nn.Conv2d(u, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LLVFSR(nn.Module):
    """LLV-FSR face super-resolution network; ``forward(lr, mask, depth, caption, description)``."""

    def __init__(self, config: LLVFSRConfig | None = None):
        super().__init__()
        cfg = self.config = config or LLVFSRConfig()
        c, priors = cfg.width, cfg.enabled_priors
        self.extract = nn.Conv2d(3, c, 3, padding=1)
        self.encoders = nn.ModuleDict()
        if "mask" in priors:
            self.encoders["mask"] = SpatialPriorEncoder(cfg.mask_classes, c)
        if "depth" in priors:
            self.encoders["depth"] = SpatialPriorEncoder(1, c)
        for name in TEXT_PRIORS:
            if name in priors:
                self.encoders[name] = TextProjector(cfg.text_dim, c)
        if cfg.variant == "full":
            self.fusions = nn.ModuleList(LVPFB(c, cfg.heads, priors, cfg.desa_mode) for _ in range(cfg.depth))
        elif cfg.variant == "model2":
            self.fusions = nn.ModuleList(ConcatFusion(c, priors) for _ in range(cfg.depth))
        else:
            self.fusions = nn.ModuleList()
        self.blocks = nn.ModuleList(
            BasicBlock(c, cfg.heads, cfg.window, cfg.mlp_ratio, cfg.block_conv) for _ in range(cfg.depth)
        )
        self.body_end = nn.Conv2d(c, c, 3, padding=1)
        self.reconstruct = Reconstructor(cfg)

    @property
    def priors(self) -> tuple[str, ...]:
        """Priors this network uses; others passed to forward are ignored."""
        return self.config.enabled_priors

    def prior_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """Named parameters that only the prior ``name`` feeds (its encoder and its LVPFB branches)."""
        if name not in PRIOR_NAMES:
            raise ValueError(f"unknown prior {name!r}; expected one of {PRIOR_NAMES}")
        out = []
        for pname, p in self.named_parameters():
            parts = pname.split(".")
            if parts[:2] == ["encoders", name] or (
                parts[0] == "fusions" and parts[2:4] == ["branches", name]
            ):
                out.append((pname, p))
        return out

    def forward(
        self,
        lr: torch.Tensor,
        mask: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        caption=None,
        description=None,
    ) -> torch.Tensor:
        """Super-resolve ``lr`` [B,3,h,w] in [0,1]; priors are optional, any resolution for mask/depth."""
        base = self._base(lr)
        feat0 = self.extract(lr)
        raw = {"mask": mask, "depth": depth, "caption": caption, "description": description}
        priors = self.encode_priors(feat0.shape[-2:], lr.shape[0], raw)
        x = feat0
        for i, block in enumerate(self.blocks):
            if self.fusions:
                x = self.fusions[i](x, priors)
            x = block(x)
        return self.reconstruct(self.body_end(x) + feat0) + base

    def _base(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"lr must be [B,3,H,W], got {tuple(lr.shape)}")
        if self.config.upsample == "pre_bicubic":
            return lr
        return F.interpolate(lr, scale_factor=self.config.scale, mode="bicubic", align_corners=False)

    def encode_priors(self, size: tuple[int, int], batch: int, raw: dict[str, Any]) -> EncodedPriors:
        """Encode the present, enabled priors at the working ``size``; each with a per-sample keep."""
        out: EncodedPriors = {}
        for name in self.priors:
            value = raw.get(name)
            if value is None:
                continue
            if name in TEXT_PRIORS:
                feat, keep = self._encode_text(name, value, batch)
            else:
                feat, keep = self.encoders[name](self._resize(name, value, size, batch)), None
            keep = self._dropout(keep, batch)
            # All samples without this prior: skip the branch entirely (its parameters get no gradient).
            if keep is not None and not bool(keep.any()):
                continue
            out[name] = (feat, keep if keep is not None else torch.ones(batch, device=self._device()))
        return out

    def _device(self) -> torch.device:
        return self.extract.weight.device

    def _dtype(self) -> torch.dtype:
        return self.extract.weight.dtype

    def _dropout(self, keep: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        p = self.config.prior_dropout
        if not (self.training and p > 0):
            return keep
        drawn = (torch.rand(batch, device=self._device()) >= p).float()
        return drawn if keep is None else keep * drawn

    def _resize(self, name: str, value: torch.Tensor, size: tuple[int, int], batch: int) -> torch.Tensor:
        want = self.config.mask_classes if name == "mask" else 1
        if value.dim() != 4 or value.shape[0] != batch or value.shape[1] != want:
            raise ValueError(f"{name} must be [{batch},{want},H,W], got {tuple(value.shape)}")
        value = value.to(self._device(), self._dtype())
        if tuple(value.shape[-2:]) == tuple(size):
            return value
        if name == "mask":
            mode = self.config.mask_resize if value.shape[-1] > size[-1] else "nearest"
            return F.interpolate(value, size=size, mode=mode)
        shrink = value.shape[-1] > size[-1]
        return F.interpolate(value, size=size, mode="bilinear", align_corners=False, antialias=shrink)

    def _encode_text(self, name: str, value, batch: int) -> tuple[TextFeatures, torch.Tensor]:
        tokens = getattr(value, "tokens", None)
        attn = getattr(value, "attention_mask", None)
        if not isinstance(tokens, torch.Tensor) or not isinstance(attn, torch.Tensor):
            raise ValueError(
                f"{name} must be a TextEmbedding (tokens, attention_mask, pooled), got {type(value)}"
            )
        d = self.config.text_dim
        if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != d:
            raise ValueError(f"{name}.tokens must be [{batch},T,{d}], got {tuple(tokens.shape)}")
        if tuple(attn.shape) != tuple(tokens.shape[:2]):
            raise ValueError(
                f"{name}.attention_mask must be {tuple(tokens.shape[:2])}, got {tuple(attn.shape)}"
            )
        dev = self._device()
        valid = attn.to(dev) > 0
        keep = valid.any(dim=1).float()  # a text with no real token counts as absent
        valid[:, 0] |= ~valid.any(dim=1)  # ... but keeps one token so attention stays finite
        proj = self.encoders[name]
        tok = proj(tokens.to(dev, self._dtype()))
        if self.config.text_pool == "pooled":
            pooled = getattr(value, "pooled", None)
            if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (batch, d):
                got = None if pooled is None else tuple(getattr(pooled, "shape", ()))
                raise ValueError(f"{name}.pooled must be [{batch},{d}] when text_pool='pooled', got {got}")
            vec = proj(pooled.to(dev, self._dtype()))
        else:
            w = valid.unsqueeze(-1).to(tok.dtype)
            vec = (tok * w).sum(1) / w.sum(1)
        return TextFeatures(tok, valid, vec), keep


def build_llvfsr(config: LLVFSRConfig | str = "small", **overrides) -> LLVFSR:
    """Build a network from a config or a preset name, with optional field overrides."""
    cfg = llvfsr_config(config, **overrides) if isinstance(config, str) else replace(config, **overrides)
    return LLVFSR(cfg)


class LoadedLLVFSR(NamedTuple):
    """What :func:`load_llvfsr` returns."""

    model: LLVFSR
    trained_with: dict[str, dict]
    metadata: dict[str, str]


def save_llvfsr(
    model: LLVFSR,
    path: str | os.PathLike,
    trained_with: dict[str, dict] | None = None,
    extra_metadata: dict[str, str] | None = None,
):
    """Write weights as safetensors with the config and the prior extractors used for training."""
    if not isinstance(model, LLVFSR):
        raise ValueError(f"save_llvfsr needs an LLVFSR model, got {type(model).__name__}")
    meta = dict(extra_metadata or {})
    meta[TRAINED_WITH_KEY] = json.dumps(trained_with or {}, sort_keys=True)
    return save_safetensors(model.state_dict(), path, ARCHITECTURE, model.config.to_dict(), meta)


def load_llvfsr(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedLLVFSR:
    """Rebuild an LLV-FSR network from a file written by :func:`save_llvfsr` (strict key check)."""
    ckpt = read_checkpoint(path)
    if ckpt.architecture != ARCHITECTURE:
        raise ValueError(f"{path} holds architecture {ckpt.architecture!r}, expected {ARCHITECTURE!r}")
    model = LLVFSR(LLVFSRConfig.from_dict(ckpt.config))
    load_weights(model, ckpt.content, source=str(path))
    trained_with = json.loads(ckpt.metadata.get(TRAINED_WITH_KEY) or "{}")
    logger.debug("loaded LLV-FSR %s (trained with %s)", path, sorted(trained_with))
    return LoadedLLVFSR(model.to(device).eval(), trained_with, ckpt.metadata)
