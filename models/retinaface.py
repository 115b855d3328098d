"""RetinaFace face detector (box + 5 landmarks): MobileNetV1-0.25 or ResNet-50 backbone, FPN, SSH.

Written from the published architecture (Deng et al., "RetinaFace", 2019) and the key layout of
the widely used Pytorch_Retinaface / facexlib checkpoints (``body.*``, ``fpn.*``, ``ssh1-3.*``,
``ClassHead/BboxHead/LandmarkHead.{0,1,2}.conv1x1``), so those files load with strict key checks.
The network takes BGR pixels in 0..255 minus the mean (104, 117, 123); :func:`decode` turns its
outputs into pixel boxes and landmarks of the network input. Two training recipes share the key
layout but differ in activations and anchor sizes (``VARIANTS``); the caller names the variant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

BGR_MEAN = (104.0, 117.0, 123.0)
STEPS = (8, 16, 32)  # stride of each pyramid level
VARIANCES = (0.1, 0.2)  # SSD-style encoding variances for centre and size
ANCHORS_PER_CELL = 2

# Backbone stage widths fed to the FPN, and the FPN width.
CONFIGS = {
    "mobilenet0.25": {"in_channels": (64, 128, 256), "out_channels": 64},
    "resnet50": {"in_channels": (512, 1024, 2048), "out_channels": 256},
}
# Training recipes sharing one key layout but not the same network: Pytorch_Retinaface (and
# facexlib's copies) use LeakyReLU(0.1) in the MobileNet variant and anchors 16-512 px;
# Face-Detector-1MB-with-landmark uses plain ReLU and anchors 10-256 px. Weights cannot tell
# them apart by key names or shapes, so the variant is chosen by the caller (see detection code).
VARIANTS = {
    "pytorch_retinaface": {"leaky": 0.1, "min_sizes": ((16, 32), (64, 128), (256, 512))},
    "face_detector_1mb": {"leaky": 0.0, "min_sizes": ((10, 20), (32, 64), (128, 256))},
}


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, leaky: float | None, groups: int = 1):
    """Conv (no bias) + BatchNorm, then LeakyReLU unless ``leaky`` is None (keys .0 conv, .1 bn)."""
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if leaky is not None:
        layers.append(nn.LeakyReLU(negative_slope=leaky, inplace=True))
    return nn.Sequential(*layers)


def _conv_dw(cin: int, cout: int, stride: int, leaky: float) -> nn.Sequential:
    """Depthwise 3x3 + pointwise 1x1, each with BN and LeakyReLU (keys .0/.1 and .3/.4)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


class MobileNetV1x025(nn.Module):
    """MobileNetV1 at width 0.25, returning the stride-8, -16 and -32 feature maps."""

    def __init__(self, leaky: float):
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 3, 2, leaky),
            _conv_dw(8, 16, 1, leaky),
            _conv_dw(16, 32, 2, leaky),
            _conv_dw(32, 32, 1, leaky),
            _conv_dw(32, 64, 2, leaky),
            _conv_dw(64, 64, 1, leaky),
        )
        self.stage2 = nn.Sequential(
            _conv_dw(64, 128, 2, leaky), *[_conv_dw(128, 128, 1, leaky) for _ in range(5)]
        )
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2, leaky), _conv_dw(256, 256, 1, leaky))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class ResNet50Body(nn.Module):
    """torchvision ResNet-50 without its classifier, returning layer2-4 (strides 8, 16, 32)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50  # lazy: only the ResNet variant needs torchvision models

        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    """Feature pyramid: 1x1 laterals, nearest upsampling, 3x3 merges on the two finer levels."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, leaky: float):
        super().__init__()
        self.output1 = _conv_bn(in_channels[0], out_channels, 1, 1, leaky)
        self.output2 = _conv_bn(in_channels[1], out_channels, 1, 1, leaky)
        self.output3 = _conv_bn(in_channels[2], out_channels, 1, 1, leaky)
        self.merge1 = _conv_bn(out_channels, out_channels, 3, 1, leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, 3, 1, leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields by stacked 3x3 convs."""

    def __init__(self, channels: int, leaky: float):
        super().__init__()
        if channels % 4:
            raise ValueError(f"SSH channels must be divisible by 4, got {channels}")
        q = channels // 4
        self.conv3X3 = _conv_bn(channels, channels // 2, 3, 1, None)
        self.conv5X5_1 = _conv_bn(channels, q, 3, 1, leaky)
        self.conv5X5_2 = _conv_bn(q, q, 3, 1, None)
        self.conv7X7_2 = _conv_bn(q, q, 3, 1, leaky)
        self.conv7x7_3 = _conv_bn(q, q, 3, 1, None)  # lower-case x: the checkpoints spell it so

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = self.conv5X5_1(x)
        c7 = self.conv7x7_3(self.conv7X7_2(c5_1))
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5_1), c7], dim=1))


class _Head(nn.Module):
    """1x1 conv predicting ``per_anchor`` numbers for each anchor of each cell."""

    def __init__(self, channels: int, per_anchor: int):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(channels, ANCHORS_PER_CELL * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, A*k, H, W] -> [B, H*W*A, k]: row-major cells, anchors innermost, matching prior_boxes.
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """RetinaFace network; forward returns (box deltas, face probabilities, landmark deltas)."""

    def __init__(self, backbone: str = "mobilenet0.25", variant: str = "pytorch_retinaface"):
        super().__init__()
        if backbone not in CONFIGS:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r}; expected one of {sorted(CONFIGS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown RetinaFace variant {variant!r}; expected one of {sorted(VARIANTS)}")
        self.backbone, self.variant = backbone, variant  # recorded so a file can rebuild the model
        self.min_sizes = VARIANTS[variant]["min_sizes"]
        cfg, width = CONFIGS[backbone], CONFIGS[backbone]["out_channels"]
        # The 256-wide ResNet model uses plain ReLU after the backbone (slope 0 for widths > 64).
        leaky = VARIANTS[variant]["leaky"] if width <= 64 else 0.0
        self.body = MobileNetV1x025(leaky) if backbone == "mobilenet0.25" else ResNet50Body()
        self.fpn = FPN(cfg["in_channels"], width, leaky)
        self.ssh1, self.ssh2, self.ssh3 = SSH(width, leaky), SSH(width, leaky), SSH(width, leaky)
        self.ClassHead = nn.ModuleList([_Head(width, 2) for _ in STEPS])
        self.BboxHead = nn.ModuleList([_Head(width, 4) for _ in STEPS])
        self.LandmarkHead = nn.ModuleList([_Head(width, 10) for _ in STEPS])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.fpn(self.body(x))
        feats = [self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats, strict=True)], dim=1)
        logits = torch.cat([h(f) for h, f in zip(self.ClassHead, feats, strict=True)], dim=1)
        ldm = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats, strict=True)], dim=1)
        return loc, logits.softmax(dim=-1)[..., 1], ldm


def backbone_of(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Recognise the backbone of a RetinaFace state dict from its key names."""
    if any(k.startswith("body.stage1.") for k in state_dict):
        return "mobilenet0.25"
    if any(k.startswith("body.layer1.") for k in state_dict):
        return "resnet50"
    sample = ", ".join(list(state_dict)[:5])
    raise ValueError(
        "not a RetinaFace checkpoint: expected 'body.stage1.*' (MobileNet-0.25) or 'body.layer1.*' "
        f"(ResNet-50) keys, got {sample}, ..."
    )


def prior_boxes(
    height: int, width: int, min_sizes: tuple[tuple[int, ...], ...], device: torch.device | None = None
) -> torch.Tensor:
    """Anchors [N, 4] as (cx, cy, w, h) in pixels of a ``height`` x ``width`` network input."""
    rows = []
    for step, sizes in zip(STEPS, min_sizes, strict=True):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid(
            (torch.arange(fh, dtype=torch.float32) + 0.5) * step,
            (torch.arange(fw, dtype=torch.float32) + 0.5) * step,
            indexing="ij",
        )
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor(sizes, dtype=torch.float32).reshape(1, -1, 1).expand(centres.shape[0], -1, 2)
        rows.append(torch.cat([centres, wh], dim=-1).reshape(-1, 4))
    return torch.cat(rows).to(device)


def decode(loc: torch.Tensor, ldm: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deltas of one image ([N,4], [N,10]) -> boxes [N,4] (x1,y1,x2,y2) and landmarks [N,5,2]."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    points = priors[:, None, :2] + ldm.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]
    return boxes, points
