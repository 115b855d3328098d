"""LPIPS v0.1 with the VGG16 backbone (Zhang et al., 2018), as plain torch.

Parameter names follow the two files users already have: the VGG16 convolutions are
``features.{i}`` exactly as in torchvision's ``vgg16-397923af.pth`` (its ``classifier.*`` keys are
unused), and the five 1x1 linear heads are ``lin{k}.model.1.weight`` as in LPIPS v0.1's
``vgg.pth`` (``model.0`` is a parameter-free dropout in the original). The input scaling
constants are fixed numbers, not weights, so they are non-persistent buffers.
"""

from __future__ import annotations

import torch
from torch import nn

# VGG16 configuration "D": output channels per conv, "M" for a 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Index in ``features`` just after each ReLU LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_ENDS = (4, 9, 16, 23, 30)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS ScalingLayer: inputs in [-1, 1] are shifted and scaled to ImageNet-like statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # LPIPS normalize_tensor epsilon


def vgg16_features() -> nn.Sequential:
    """VGG16 conv layers up to relu5_3, indexed like torchvision's ``vgg16().features``."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = v
    return nn.Sequential(*layers)


class LinearHead(nn.Module):
    """LPIPS NetLinLayer: (dropout slot) + 1x1 conv to one channel without bias."""

    def __init__(self, channels: int):
        super().__init__()
        # Index 0 is LPIPS's dropout (off at evaluation); keeping the slot keeps the key "model.1".
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(feat: torch.Tensor) -> torch.Tensor:
    norm = torch.sqrt((feat**2).sum(dim=1, keepdim=True))
    return feat / (norm + _EPS)


class LPIPSVGG(nn.Module):
    """LPIPS distance (v0.1, 'vgg'): images in [0, 1], returns one distance per image ``[B]``."""

    def __init__(self):
        super().__init__()
        self.config: dict = {"version": "0.1", "net": "vgg"}
        self.features = vgg16_features()
        for k, ch in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(ch))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU feature maps LPIPS compares, for images in [0, 1]."""
        h = ((x * 2.0 - 1.0) - self.shift) / self.scale
        outs, start = [], 0
        for end in TAP_ENDS:
            h = self.features[start:end](h)
            outs.append(h)
            start = end
        return outs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two [B,3,H,W] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
            )
        total = a.new_zeros(a.shape[0])
        for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b), strict=True)):
            diff = (_unit_normalize(fa) - _unit_normalize(fb)) ** 2
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return total
