"""VSPBFR restoration network (official ``Restoration_net(512, 512, 8, channel_multiplier=2)``).

Inputs: the LQ face (B,3,S,S) in [-1,1], the StyleGAN2 feature bank of the diffused prompt, the
prompt w0 (B,>=16,512) and random z. Structure (keys as in the official ``g_ema``):

* latents: the mapping MLP ``style.{1..8}`` maps z (two z's with a random crossover index when
  style mixing happens, probability 0.5) to w_noise; per layer j < n_latent (16 at 512) the style
  is concat(w0[:, j], w_noise[:, j]) (2*512);
* encoder: ``down_from_big`` (1x1 LargeConvLayer) at full size, then per resolution S..8 a SMART
  layer (its output is the skip feature) and a blur+stride-2 modulated conv
  (``encoder_convs.{2k,2k+1}``); both use the *layer-reversed* latent 2k and the reversed noise
  list. At 4x4: ``final_layer`` (3x3 LargeConvLayer) -> flatten -> ``final_linear.0`` + dropout =
  x_global (1024); ``final_transfer(x_global)`` reshaped to 4x4 is added to the 4x4 feature;
* decoder (style = concat(layer latent, x_global), 4*512): ``conv1`` = SMART on the encoder's 4x4
  feature (no constant input), ``to_rgb1``; per resolution 8..S: ``convs.{2k}`` (upsampling
  StyledConv), then ``out += encoder skip + feature-bank map`` of that resolution, ``convs.{2k+1}``
  (SMART), ``to_rgbs.{k}`` with the upsampled RGB skip.

SMART layer: despite the paper's "transformer" wording, the official SMART is *not* attention.
It is one shared modulation EqualLinear (bias init 1) feeding four demodulated 3x3 modulated convs
with dilations 1/2/4/8 (out/4 channels each, weights (1,out/4,in,3,3),
``ModulatedConv2ds.{0..3}.weight``), concatenated, a ``fusion`` ConvLayer 3x3, NoiseInjection and
FusedLeakyReLU. ``noises.noise_*`` buffers exist in the weights but the official test uses fresh
noise; so does this port (drawn from the ``torch.Generator`` passed to ``forward``).
The official ``Dropout2d`` on the (B,1024) x_global acted element-wise in torch 1.12; ``nn.Dropout``
reproduces that (it only matters in training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .stylegan2_ops import (
    ConvLayer,
    EqualConv2d,
    EqualLinear,
    FusedLeakyReLU,
    ModulatedConv2d,
    NoiseInjection,
    PixelNorm,
    ResolutionLadder,
    StyledConv,
    ToRGB,
    randn_like_shape,
)

ARCHITECTURE = "vspbfr_restoration"
DILATIONS = (1, 2, 4, 8)


@dataclass(frozen=True)
class RestorationConfig(ResolutionLadder):
    """Restoration network hyperparameters; defaults are the released model's."""

    size: int = 512
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channel_divisor: int = 1  # divides every width (tiny test models); 1 for the real model
    lr_mlp: float = 0.01

    def __post_init__(self):
        log = math.log2(self.size) if self.size > 0 else 0
        if self.size < 8 or log != int(log):
            raise ValueError(f"restoration size must be a power of two >= 8, got {self.size}")
        bad = [r for r, c in self.channels.items() if r <= self.size and c % len(DILATIONS)]
        if bad:
            raise ValueError(f"channels at resolutions {bad} are not divisible by {len(DILATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class SMARTLayer(nn.Module):
    """Shared modulation + 4 dilated modulated 3x3 convs -> fusion ConvLayer -> noise -> lrelu."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int):
        super().__init__()
        self.ModulatedConv2ds = nn.ModuleList(
            ModulatedConv2d(in_ch, out_ch // len(DILATIONS), 3, style_dim, dilation=r, own_modulation=False)
            for r in DILATIONS
        )
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1)
        self.fusion = ConvLayer(out_ch, out_ch, 3)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x, style, generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.modulation(style)
        out = self.fusion(torch.cat([conv(x, s) for conv in self.ModulatedConv2ds], dim=1))
        return self.activate(self.noise(out, None, generator))


class LargeConvLayer(nn.Module):
    """Four dilated EqualConv2d (no bias, out/4 each) -> ``fusion`` ConvLayer 1x1 -> FusedLeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__()
        self.dilated_convs = nn.ModuleList(
            EqualConv2d(
                in_ch,
                out_ch // len(DILATIONS),
                kernel_size,
                padding=(kernel_size - 1) * r // 2,
                bias=False,
                dilation=r,
            )
            for r in DILATIONS
        )
        self.fusion = ConvLayer(out_ch, out_ch, 1)
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.fusion(torch.cat([conv(x) for conv in self.dilated_convs], dim=1)))


class RestorationNet(nn.Module):
    """LQ face + feature bank + prompt code + z -> restored face (B,3,S,S), roughly [-1,1]."""

    def __init__(self, config: RestorationConfig | None = None):
        super().__init__()
        cfg = self.config = config or RestorationConfig()
        ch, d = cfg.channels, cfg.style_dim
        self.global_dim = 2 * ch[4]  # x_global width (1024)
        enc_dim, dec_dim = 2 * d, 2 * d + self.global_dim  # 1024 and 2048 for the real model
        self.conv1 = SMARTLayer(ch[4], ch[4], dec_dim)
        self.to_rgb1 = ToRGB(ch[4], dec_dim, upsample=False)
        mlp = [EqualLinear(d, d, lr_mul=cfg.lr_mlp, activation="fused_lrelu") for _ in range(cfg.n_mlp)]
        self.style = nn.Sequential(PixelNorm(), *mlp)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range((cfg.log_size - 2) * 2 + 1):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for log_res in range(3, cfg.log_size + 1):
            out_ch = ch[2**log_res]
            self.convs.append(StyledConv(in_ch, out_ch, 3, dec_dim, upsample=True))
            self.convs.append(SMARTLayer(out_ch, out_ch, dec_dim))
            self.to_rgbs.append(ToRGB(out_ch, dec_dim))
            in_ch = out_ch
        self.down_from_big = LargeConvLayer(3, ch[cfg.size], 1)
        self.encoder_convs = nn.ModuleList()
        in_ch = ch[cfg.size]
        for log_res in range(cfg.log_size, 2, -1):
            mid, out_ch = ch[2**log_res], ch[2 ** (log_res - 1)]
            self.encoder_convs.append(SMARTLayer(in_ch, mid, enc_dim))
            self.encoder_convs.append(StyledConv(mid, out_ch, 3, enc_dim, downsample=True))
            in_ch = out_ch
        self.final_layer = LargeConvLayer(in_ch, ch[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(ch[4] * 16, self.global_dim, activation="fused_lrelu"), nn.Dropout(0.5)
        )
        self.final_transfer = EqualLinear(self.global_dim, ch[4] * 16, activation="fused_lrelu")

    @property
    def n_latent(self) -> int:
        """Number of per-layer latents (16 at 512)."""
        return self.config.n_latent

    def latents(
        self,
        prompt: torch.Tensor,
        z: torch.Tensor | Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        mixing_prob: float = 0.5,
        inject_index: int | None = None,
    ) -> torch.Tensor:
        """Per-layer styles (B,n_latent,2D) = concat(prompt[:, :n_latent], mapped z with style mixing)."""
        n, d = self.n_latent, self.config.style_dim
        if prompt.dim() != 3 or prompt.shape[1] < n or prompt.shape[2] != d:
            raise ValueError(f"prompt must be [B,>={n},{d}], got {tuple(prompt.shape)}")
        b = prompt.shape[0]
        if z is None:
            draw = torch.rand((), generator=generator, device=generator.device if generator else None)
            count = 2 if mixing_prob > 0 and float(draw) < mixing_prob else 1
            z = [randn_like_shape((b, d), prompt, generator) for _ in range(count)]
        zs = [z] if isinstance(z, torch.Tensor) else list(z)
        if not 1 <= len(zs) <= 2 or any(tuple(t.shape) != (b, d) for t in zs):
            raise ValueError(f"z must be one or two tensors [{b},{d}], got {[tuple(t.shape) for t in zs]}")
        ws = [self.style(t.to(prompt)) for t in zs]
        if len(ws) == 1:
            w_noise = ws[0].unsqueeze(1).expand(-1, n, -1)
        else:
            if inject_index is None:
                gen_dev = generator.device if generator else None
                inject_index = int(torch.randint(1, n, (), generator=generator, device=gen_dev))
            if not 1 <= inject_index <= n - 1:
                raise ValueError(f"inject_index must be in [1, {n - 1}], got {inject_index}")
            w_noise = torch.cat(
                [
                    ws[0].unsqueeze(1).expand(-1, inject_index, -1),
                    ws[1].unsqueeze(1).expand(-1, n - inject_index, -1),
                ],
                dim=1,
            )
        return torch.cat([prompt[:, :n], w_noise], dim=-1)

    def encode(self, images: torch.Tensor, latent: torch.Tensor, generator=None):
        """Encoder pass: (x_global (B,1024), skip features ordered 4x4, 8x8, ..., SxS)."""
        rev = torch.flip(latent, dims=[1])
        out = self.down_from_big(images)
        features = []
        for k in range(0, len(self.encoder_convs), 2):
            out = self.encoder_convs[k](out, rev[:, k], generator)
            features.append(out)
            out = self.encoder_convs[k + 1](out, rev[:, k], None, generator)
        out = self.final_layer(out)
        x_global = self.final_linear(out.reshape(out.shape[0], -1))
        features.append(out + self.final_transfer(x_global).reshape(out.shape))
        return x_global, features[::-1]

    def forward(
        self,
        images: torch.Tensor,
        feature_bank: Sequence[torch.Tensor],
        prompt: torch.Tensor,
        z: torch.Tensor | Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        mixing_prob: float = 0.5,
        inject_index: int | None = None,
    ) -> torch.Tensor:
        """Restore ``images`` (B,3,S,S) in [-1,1]; ``feature_bank[k]`` is the StyleGAN map at 4*2^k."""
        cfg = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, cfg.size, cfg.size):
            raise ValueError(f"images must be [B,3,{cfg.size},{cfg.size}], got {tuple(images.shape)}")
        self._check_bank(feature_bank, images.shape[0])
        latent = self.latents(prompt.to(images), z, generator, mixing_prob, inject_index)
        x_global, skips = self.encode(images, latent, generator)

        def style(j: int) -> torch.Tensor:
            return torch.cat([latent[:, j], x_global], dim=1)

        out = self.conv1(skips[0], style(0), generator)
        rgb = self.to_rgb1(out, style(1))
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1
            out = self.convs[2 * k](out, style(i), None, generator)
            out = out + skips[k + 1] + feature_bank[k + 1].to(out)
            out = self.convs[2 * k + 1](out, style(i + 1), generator)
            rgb = to_rgb(out, style(i + 2), rgb)
        return rgb

    def _check_bank(self, bank: Sequence[torch.Tensor], batch: int) -> None:
        cfg = self.config
        need = cfg.log_size - 1  # maps at 4..S; the 4x4 one is not used but keeps the indexing
        if len(bank) < need:
            raise ValueError(f"feature_bank needs >= {need} maps (4x4..{cfg.size}), got {len(bank)}")
        for k in range(1, need):
            res = 4 * 2**k
            want = (batch, cfg.channels[res], res, res)
            if tuple(bank[k].shape) != want:
                raise ValueError(f"feature_bank[{k}] must be {list(want)}, got {list(bank[k].shape)}")
