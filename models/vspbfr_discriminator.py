"""VSPBFR's stage-2 discriminator (official ``models/RestoreNet.py: Discriminator``), as plain torch.

A StyleGAN2 residual discriminator with the official key names, so the ``d`` entry of the released
``restoration_net.pt`` loads strictly:

* ``encoder_input_convs`` = ConvLayer 1x1 (3 -> C(size)), keys ``encoder_input_convs.0.weight``,
  ``encoder_input_convs.1.bias``;
* ``encoder_convs.{i}`` = ResBlocks from ``size`` down to 4x4: ``conv1`` (3x3), ``conv2`` (blur +
  stride-2 3x3), ``skip`` (blur + stride-2 1x1, no bias, no activation); out = (conv + skip) / sqrt(2);
  the blur kernels are persistent buffers (``conv2.0.kernel``, ``skip.0.kernel``) as in rosinality;
* minibatch standard deviation (group 4, 1 feature) appended as one channel;
* ``final_conv`` ConvLayer 3x3 (C(4)+1 -> C(4)); ``final_linear.0`` EqualLinear(16 C(4) -> C(4),
  fused lrelu), ``final_linear.1`` EqualLinear(C(4) -> 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import load_weights
from .state_dicts import strip_prefix
from .stylegan2_ops import ConvLayer, EqualLinear, ResolutionLadder

ARCHITECTURE = "vspbfr_discriminator"


@dataclass(frozen=True)
class DiscriminatorConfig(ResolutionLadder):
    """Discriminator hyperparameters; defaults are the official stage-2 ones (512 px, config-f)."""

    size: int = 512
    channel_multiplier: int = 2
    channel_divisor: int = 1  # divides every width; 1 for the real model, larger for tiny tests
    input_channels: int = 3
    stddev_group: int = 4

    def __post_init__(self):
        log = math.log2(self.size) if self.size > 0 else 0
        if self.size < 8 or log != int(log):
            raise ValueError(f"discriminator size must be a power of two >= 8, got {self.size}")
        for name in ("channel_multiplier", "channel_divisor", "input_channels", "stddev_group"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class ResBlock(nn.Module):
    """3x3 conv, downsampling 3x3 conv, and a downsampling 1x1 skip; sum scaled by 1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, bias=False, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Append the mean per-group standard deviation as one channel (StyleGAN2, one feature)."""
    b, c, h, w = x.shape
    group = min(b, group_size)
    if b % group:
        raise ValueError(f"batch size {b} must be a multiple of the stddev group {group}")
    y = x.view(group, -1, 1, c, h, w)
    y = torch.sqrt(y.var(0, unbiased=False) + 1e-8).mean([2, 3, 4], keepdim=True).squeeze(2)
    return torch.cat([x, y.repeat(group, 1, h, w)], dim=1)


class VSPBFRDiscriminator(nn.Module):
    """Images (B,C,S,S) in [-1,1] -> realness logits (B,1)."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        cfg = self.config = config or DiscriminatorConfig()
        ch = cfg.channels
        self.encoder_input_convs = ConvLayer(cfg.input_channels, ch[cfg.size], 1)
        self.encoder_convs = nn.ModuleList()
        in_ch = ch[cfg.size]
        for log_res in range(cfg.log_size, 2, -1):
            out_ch = ch[2 ** (log_res - 1)]
            self.encoder_convs.append(ResBlock(in_ch, out_ch))
            in_ch = out_ch
        self.final_conv = ConvLayer(in_ch + 1, ch[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(ch[4] * 16, ch[4], activation="fused_lrelu"), EqualLinear(ch[4], 1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        want = (cfg.input_channels, cfg.size, cfg.size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be [B,{','.join(map(str, want))}], got {tuple(images.shape)}")
        out = self.encoder_input_convs(images)
        for block in self.encoder_convs:
            out = block(out)
        out = self.final_conv(minibatch_stddev(out, cfg.stddev_group))
        return self.final_linear(out.reshape(out.shape[0], -1))


def infer_discriminator_config(sd: Mapping[str, torch.Tensor]) -> DiscriminatorConfig:
    """Config from an official-layout state dict (size from the number of ResBlocks, widths from shapes)."""
    what = "VSPBFR discriminator"
    for key in ("encoder_input_convs.0.weight", "final_conv.0.weight"):
        if key not in sd:
            raise ValueError(f"{what}: expected key {key!r} is missing (got e.g. {sorted(sd)[:5]})")
    blocks = {
        int(m.group(1)) for k in sd if (m := re.fullmatch(r"encoder_convs\.(\d+)\.conv1\.0\.weight", k))
    }
    size = 2 ** (len(blocks) + 2)
    ch4 = sd["final_conv.0.weight"].shape[0]
    if 512 % ch4:
        raise ValueError(f"{what}: 4x4 width {ch4} does not divide 512")
    divisor, multiplier = 512 // ch4, 2
    if size >= 64:  # widths from 64 px on depend on the multiplier; read the full-size input conv
        top = sd["encoder_input_convs.0.weight"].shape[0]
        base = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}[size]
        multiplier = max(1, round(top * divisor / base))
    return DiscriminatorConfig(
        size=size,
        channel_multiplier=multiplier,
        channel_divisor=divisor,
        input_channels=sd["encoder_input_convs.0.weight"].shape[1],
    )


def discriminator_from_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> VSPBFRDiscriminator:
    """Build a discriminator whose config fits ``sd`` and load it strictly (``module.`` prefixes dropped)."""
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = strip_prefix(sd, "module.")
    model = VSPBFRDiscriminator(infer_discriminator_config(sd))
    load_weights(model, sd, source=source)
    return model
