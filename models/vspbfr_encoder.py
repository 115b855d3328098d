"""VSPBFR style encoder: e4e ``Encoder4Editing`` with an IR-SE-50 backbone, as plain torch.

Layout and keys follow the e4e code (``input_layer``, ``body.{i}`` bottleneck_IR_SE units,
``styles.{0..17}`` GradualStyleBlocks, ``latlayer1``, ``latlayer2``) so the ``encoder.*`` weights
of VSPBFR's ``style_encoder_decoder.pt`` load strictly. Inference stage only: head 0 predicts the
base code w, repeated over all layers, and every other head adds a delta (coarse heads read the
deepest map c3, middle heads the FPN map p2 = up(c3) + latlayer1(c2), fine heads p1 = up(p2) +
latlayer2(c1)). :class:`StyleEncoder` adds the ``latent_avg`` (``start_from_latent_avg``) and the
official bilinear resize of the input to 256.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .stylegan2_ops import EqualLinear

ARCHITECTURE = "e4e_encoder"
COARSE_END, MIDDLE_END = 3, 7  # styles [0,3) coarse, [3,7) middle, [7,n) fine (e4e constants)


@dataclass(frozen=True)
class E4EConfig:
    """Encoder hyperparameters; defaults are IR-SE-50 with 18 styles at 256x256 input."""

    input_size: int = 256
    units: tuple[int, ...] = (3, 4, 14, 3)  # bottleneck units per stage (IR-50)
    widths: tuple[int, ...] = (64, 128, 256, 512)  # stage widths; the last is the style width
    num_styles: int = 18
    input_channels: int = 3
    se_reduction: int = 16

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.units) != 4 or len(self.widths) != 4 or min(self.units) < 1:
            raise ValueError(f"units and widths need 4 positive entries, got {self.units}, {self.widths}")
        if self.input_size < 64 or math.log2(self.input_size) != int(math.log2(self.input_size)):
            raise ValueError(f"input_size must be a power of two >= 64, got {self.input_size}")
        if self.num_styles < 1:
            raise ValueError(f"num_styles must be >= 1, got {self.num_styles}")
        if min(self.widths) // self.se_reduction < 1:
            raise ValueError(f"widths {self.widths} too small for se_reduction {self.se_reduction}")

    @property
    def style_dim(self) -> int:
        """Width of a W code (the last stage width, 512)."""
        return self.widths[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["units"], d["widths"] = list(self.units), list(self.widths)
        return d


class SEModule(nn.Module):
    """Squeeze-and-excitation with 1x1 convs ``fc1``/``fc2`` (no bias)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    """IR-SE unit: BN-conv-PReLU-conv(stride)-BN-SE plus a shortcut (subsampling or 1x1 conv+BN)."""

    def __init__(self, in_ch: int, depth: int, stride: int, se_reduction: int):
        super().__init__()
        if in_ch == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_ch, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, se_reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """log2(spatial) stride-2 convs + LeakyReLU(0.01) down to 1x1, then an EqualLinear."""

    def __init__(self, in_ch: int, out_ch: int, spatial: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_ch, out_ch, lr_mul=1)
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_ch))


class Encoder4Editing(nn.Module):
    """e4e encoder: image (B,3,S,S) in [-1,1] at ``input_size`` -> codes (B,num_styles,512), no latent_avg."""

    def __init__(self, config: E4EConfig | None = None):
        super().__init__()
        cfg = self.config = config or E4EConfig()
        w0 = cfg.widths[0]
        self.input_layer = nn.Sequential(
            nn.Conv2d(cfg.input_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.PReLU(w0)
        )
        units, in_ch = [], w0
        for n, depth in zip(cfg.units, cfg.widths, strict=True):
            for j in range(n):
                units.append(BottleneckIRSE(in_ch, depth, 2 if j == 0 else 1, cfg.se_reduction))
                in_ch = depth
        self.body = nn.Sequential(*units)
        # Feature taps: ends of stages 2, 3, 4 (body indices 6, 20, 23 for IR-50).
        ends = [sum(cfg.units[: k + 1]) - 1 for k in range(4)]
        self.taps = (ends[1], ends[2], ends[3])
        s, d = cfg.input_size, cfg.style_dim
        self.styles = nn.ModuleList()
        for i in range(cfg.num_styles):
            spatial = s // 16 if i < COARSE_END else (s // 8 if i < MIDDLE_END else s // 4)
            self.styles.append(GradualStyleBlock(d, d, spatial))
        self.latlayer1 = nn.Conv2d(cfg.widths[2], d, 1)
        self.latlayer2 = nn.Conv2d(cfg.widths[1], d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        want = (cfg.input_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"e4e input must be [B,{want[0]},{want[1]},{want[2]}], got {tuple(x.shape)}")
        x = self.input_layer(x)
        taps = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                taps[i] = x
        c1, c2, c3 = (taps[i] for i in self.taps)
        base = self.styles[0](c3)
        codes = [base]
        features = c3
        p2 = None
        for i in range(1, cfg.num_styles):
            if i == COARSE_END:
                p2 = features = _upsample_add(c3, self.latlayer1(c2))
            elif i == MIDDLE_END:
                features = _upsample_add(p2, self.latlayer2(c1))
            codes.append(base + self.styles[i](features))
        return torch.stack(codes, dim=1)


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # e4e uses bilinear with align_corners=True here (FPN merge).
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class StyleEncoder(nn.Module):
    """LQ image in [-1,1] (any size) -> W+ code: bilinear resize to 256, e4e, + ``latent_avg``."""

    def __init__(self, config: E4EConfig | None = None, latent_avg: torch.Tensor | None = None):
        super().__init__()
        self.encoder = Encoder4Editing(config)
        cfg = self.encoder.config
        if latent_avg is None:
            latent_avg = torch.zeros(cfg.num_styles, cfg.style_dim)
        self.register_buffer("latent_avg", self._check_avg(latent_avg))

    @property
    def config(self) -> E4EConfig:
        """The encoder config."""
        return self.encoder.config

    def set_latent_avg(self, latent_avg: torch.Tensor) -> None:
        """Replace the average code ((num_styles,D), (1,D) or (D,))."""
        self.latent_avg = self._check_avg(latent_avg).to(self.latent_avg)

    def _check_avg(self, avg: torch.Tensor) -> torch.Tensor:
        cfg = self.encoder.config
        avg = avg.detach().reshape(-1, avg.shape[-1]) if avg.dim() else avg
        if avg.dim() != 2 or avg.shape[-1] != cfg.style_dim or avg.shape[0] not in (1, cfg.num_styles):
            raise ValueError(
                f"latent_avg must be [{cfg.num_styles},{cfg.style_dim}] or [{cfg.style_dim}], got {tuple(avg.shape)}"
            )
        return avg.expand(cfg.num_styles, -1).clone()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """W+ codes (B,num_styles,D) of images (B,3,H,W) in [-1,1]."""
        size = self.encoder.config.input_size
        if images.dim() != 4:
            raise ValueError(f"images must be [B,C,H,W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (size, size):
            # Official: F.interpolate(img, (256, 256), mode="bilinear") without antialiasing.
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return self.encoder(images) + self.latent_avg.unsqueeze(0)
