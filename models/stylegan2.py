"""StyleGAN2 generator (rosinality layout) that also returns VSPBFR's feature bank.

Keys match rosinality's ``Generator(size, 512, 8, channel_multiplier=2)``: ``style.{1..n_mlp}``,
``input.input``, ``conv1``, ``to_rgb1``, ``convs.{i}``, ``to_rgbs.{i}``, ``noises.noise_{i}`` (plus
the persistent blur kernels), so the e4e ``decoder.*`` weights load strictly. The feature bank is
what VSPBFR's decoder hands the restoration network: the 4x4 feature after ``conv1`` and, for each
resolution 8..size, the feature right after the first (upsampling) conv of that resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .stylegan2_ops import (
    ConstantInput,
    EqualLinear,
    PixelNorm,
    ResolutionLadder,
    StyledConv,
    ToRGB,
    randn_like_shape,
)

ARCHITECTURE = "stylegan2_generator"


@dataclass(frozen=True)
class StyleGAN2Config(ResolutionLadder):
    """Generator hyperparameters (config-f at 1024 by default)."""

    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channel_divisor: int = 1  # divides every width; 1 for the real model, larger for tiny tests
    lr_mlp: float = 0.01

    def __post_init__(self):
        log = math.log2(self.size) if self.size > 0 else 0
        if self.size < 8 or log != int(log):
            raise ValueError(f"StyleGAN2 size must be a power of two >= 8, got {self.size}")
        for name in ("style_dim", "n_mlp", "channel_multiplier", "channel_divisor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"StyleGAN2Config.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_layers(self) -> int:
        """Number of noise inputs (17 at 1024)."""
        return (self.log_size - 2) * 2 + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class StyleGAN2Output(NamedTuple):
    """Image in [-1,1]-ish range and the feature bank (4x4, then one map per resolution 8..size)."""

    image: torch.Tensor
    features: list[torch.Tensor]


class StyleGAN2Generator(nn.Module):
    """Mapping network + synthesis network; ``forward`` on W+ codes returns image and feature bank."""

    def __init__(self, config: StyleGAN2Config | None = None):
        super().__init__()
        cfg = self.config = config or StyleGAN2Config()
        d, ch = cfg.style_dim, cfg.channels
        mlp = [EqualLinear(d, d, lr_mul=cfg.lr_mlp, activation="fused_lrelu") for _ in range(cfg.n_mlp)]
        self.style = nn.Sequential(PixelNorm(), *mlp)
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, d)
        self.to_rgb1 = ToRGB(ch[4], d, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(cfg.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for log_res in range(3, cfg.log_size + 1):
            out_ch = ch[2**log_res]
            self.convs.append(StyledConv(in_ch, out_ch, 3, d, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, d))
            self.to_rgbs.append(ToRGB(out_ch, d))
            in_ch = out_ch

    @property
    def n_latent(self) -> int:
        """Number of W+ layers this generator consumes."""
        return self.config.n_latent

    def mean_latent(self, n: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
        """Average W of ``n`` mapped random z (1, style_dim)."""
        z = randn_like_shape((n, self.config.style_dim), self.input.input, generator)
        return self.style(z).mean(0, keepdim=True)

    def forward(
        self,
        latent: torch.Tensor,
        input_is_latent: bool = True,
        noise: list[torch.Tensor] | None = None,
        randomize_noise: bool = True,
        generator: torch.Generator | None = None,
        truncation: float = 1.0,
        truncation_latent: torch.Tensor | None = None,
    ) -> StyleGAN2Output:
        """Synthesise from W+ (B,n_latent,D), W (B,D) or, with ``input_is_latent=False``, z (B,D).

        Noise: explicit per-layer list, else fresh draws from ``generator`` (``randomize_noise``),
        else the stored ``noises`` buffers.
        """
        w = self._latents(latent, input_is_latent, truncation, truncation_latent)
        cfg = self.config
        if noise is None:
            noise = [None] * cfg.num_layers if randomize_noise else self.stored_noise()
        elif len(noise) != cfg.num_layers:
            raise ValueError(f"noise must be a list of {cfg.num_layers} tensors, got {len(noise)}")
        out = self.conv1(self.input(w.shape[0]), w[:, 0], noise[0], generator)
        skip = self.to_rgb1(out, w[:, 1])
        features = [out]
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1
            out = self.convs[2 * k](out, w[:, i], noise[i], generator)
            features.append(out)
            out = self.convs[2 * k + 1](out, w[:, i + 1], noise[i + 1], generator)
            skip = to_rgb(out, w[:, i + 2], skip)
        return StyleGAN2Output(skip, features)

    def stored_noise(self) -> list[torch.Tensor]:
        """The fixed noise buffers, in layer order."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.config.num_layers)]

    def _latents(self, latent, input_is_latent, truncation, truncation_latent) -> torch.Tensor:
        n, d = self.config.n_latent, self.config.style_dim
        if latent.dim() not in (2, 3) or latent.shape[-1] != d:
            raise ValueError(f"latent must be [B,{d}] or [B,{n},{d}], got {tuple(latent.shape)}")
        if not input_is_latent:
            if latent.dim() != 2:
                raise ValueError(f"z must be [B,{d}] when input_is_latent=False, got {tuple(latent.shape)}")
            latent = self.style(latent)
        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (e.g. mean_latent())")
            latent = truncation_latent + truncation * (latent - truncation_latent)
        if latent.dim() == 2:
            return latent.unsqueeze(1).expand(-1, n, -1)
        if latent.shape[1] != n:
            raise ValueError(
                f"W+ code must have {n} layers for size {self.config.size}, got {latent.shape[1]}"
            )
        return latent
