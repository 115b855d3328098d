"""VSPBFR's identity network and identity loss (official ``Loss/id_loss.py``), as plain torch.

The official ``Arcface.pth`` is a plain state dict of torchvision's ``resnet101(num_classes=256)``
(not an InsightFace IR-SE model). :class:`ArcFaceResNet` rebuilds that layout with the same keys
(``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv,bn}{1,2,3}``, ``layer{k}.0.downsample.{0,1}``, ``fc``;
ResNet v1.5 bottlenecks: the stride sits on the 3x3 conv) without importing torchvision.

Official identity loss: both faces (in [-1,1], no crop, no extra normalisation) are resized to
112x112 bilinearly (``F.interpolate(size=112, mode='bilinear')``, align_corners False, no
antialias), embedded, L2-normalised; the target's embedding is detached and the loss is
mean |1 - cos|.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weights, read_checkpoint
from .state_dicts import strip_prefix

ARCHITECTURE = "arcface_resnet"
ID_INPUT_SIZE = 112  # the official loss resizes every face to 112x112
EXPANSION = 4  # bottleneck output width = 4 x its inner width


@dataclass(frozen=True)
class ArcFaceConfig:
    """ResNet hyperparameters; defaults are torchvision ``resnet101(num_classes=256)``."""

    layers: tuple[int, ...] = (3, 4, 23, 3)  # bottlenecks per stage
    embedding_dim: int = 256  # fc output
    base_width: int = 64  # stem / first-stage inner width (64 in torchvision; smaller for tests)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers needs 4 positive block counts, got {self.layers}")
        if self.embedding_dim < 1 or self.base_width < 1:
            raise ValueError(
                f"embedding_dim and base_width must be >= 1, got {self.embedding_dim}, {self.base_width}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


class Bottleneck(nn.Module):
    """torchvision Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), BN after each, optional downsample."""

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ArcFaceResNet(nn.Module):
    """Images (B,3,H,W) -> embeddings (B,embedding_dim) (not normalised; see :func:`identity_embedding`)."""

    def __init__(self, config: ArcFaceConfig | None = None):
        super().__init__()
        cfg = self.config = config or ArcFaceConfig()
        w = cfg.base_width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = w
        for k, blocks in enumerate(cfg.layers):
            width = w * 2**k
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(in_ch, width, 2 if (i == 0 and k > 0) else 1))
                in_ch = width * EXPANSION
            self.add_module(f"layer{k + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, cfg.embedding_dim)
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def identity_embedding(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Unit embeddings of faces in [-1,1], resized to 112 bilinearly as the official loss does."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
    small = F.interpolate(images, size=ID_INPUT_SIZE, mode="bilinear", align_corners=False)
    return F.normalize(net(small), dim=1)


def identity_loss(net: nn.Module, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official ID loss: mean |1 - cos(emb(output), emb(target).detach())| for faces in [-1,1]."""
    if output.shape != target.shape:
        raise ValueError(
            f"output and target must have one shape, got {tuple(output.shape)}, {tuple(target.shape)}"
        )
    with torch.no_grad():
        ref = identity_embedding(net, target)
    cos = (identity_embedding(net, output) * ref).sum(dim=1)
    return (1.0 - cos).abs().mean()


def infer_arcface_config(sd: Mapping[str, torch.Tensor]) -> ArcFaceConfig:
    """Block counts, stem width and embedding size of a torchvision-layout ResNet state dict."""
    for key in ("conv1.weight", "fc.weight"):
        if key not in sd:
            raise ValueError(f"ArcFace ResNet: expected key {key!r} is missing (got e.g. {sorted(sd)[:5]})")
    layers = []
    for k in range(1, 5):
        idx = {int(m.group(1)) for key in sd if (m := re.fullmatch(rf"layer{k}\.(\d+)\.conv1\.weight", key))}
        if not idx:
            raise ValueError(
                f"ArcFace ResNet: no blocks found for layer{k}; not a torchvision ResNet state dict"
            )
        layers.append(len(idx))
    return ArcFaceConfig(
        layers=tuple(layers), embedding_dim=sd["fc.weight"].shape[0], base_width=sd["conv1.weight"].shape[0]
    )


def load_arcface(path: str | os.PathLike) -> ArcFaceResNet:
    """The identity network from ``Arcface.pth`` (plain state dict, read with weights_only) or safetensors."""
    content = read_checkpoint(path).content
    if (
        isinstance(content, Mapping)
        and "state_dict" in content
        and isinstance(content["state_dict"], Mapping)
    ):
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(
            f"{path} should hold a plain state dict of torchvision resnet101(num_classes=256), "
            f"got {type(content).__name__}"
        )
    sd = dict(content)
    if sd and all(k.startswith("module.") for k in sd):
        sd = strip_prefix(sd, "module.")
    net = ArcFaceResNet(infer_arcface_config(sd))
    load_weights(net, sd, source=str(path))
    return net.eval().requires_grad_(False)
