"""VSPBFR training losses and the local weight files they need (LPIPS-VGG, the ArcFace ResNet-101).

GAN terms follow the official ``restoration_train.py`` (rosinality's StyleGAN2 trainer):
non-saturating logistic losses, the R1 penalty mean_i ||d D(x_i) / d x_i||^2 on real images, applied
lazily every ``interval`` discriminator steps with weight ``r1 / 2 * interval``, and Adam settings
adjusted for lazy regularisation with c = interval / (interval + 1): lr * c, betas ** c.

Loss networks are never downloaded and never silently dropped: a term with a non-zero weight needs
its file, or an explicit ``allow_random_*`` opt-out (tests, smoke runs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.arcface_resnet import ArcFaceResNet, load_arcface
from ..models.lpips_vgg import LPIPSVGG

log = logging.getLogger(__name__)

ARCFACE_CONTENT = (
    "Arcface.pth from Hugging Face Wanglong2/VSPBFR: a plain state dict of torchvision "
    "resnet101(num_classes=256) (keys conv1, bn1, layer1..layer4, fc; fc.weight 256x2048)"
)
LPIPS_CONTENT = {
    "lpips_linear": "vgg.pth of LPIPS v0.1 (weights/v0.1/vgg.pth of the LPIPS project; keys lin0..lin4.model.1.weight)",
    "lpips_backbone": "vgg16-397923af.pth, torchvision's ImageNet VGG16 (keys features.*)",
}


def d_logistic_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    """Discriminator loss softplus(-D(real)) + softplus(D(fake)), each averaged."""
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    """Generator loss softplus(-D(fake)), averaged."""
    return F.softplus(-fake_pred).mean()


def r1_penalty(real_pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """mean over the batch of ||grad_x sum D(x)||^2 (``real`` must require grad); differentiable."""
    (grad,) = torch.autograd.grad(real_pred.sum(), real, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def lazy_ratio(interval: int) -> float:
    """c = interval / (interval + 1): share of optimizer steps without the lazy regulariser."""
    if interval < 1:
        raise ValueError(f"regularisation interval must be >= 1, got {interval}")
    return interval / (interval + 1)


def lazy_adam_settings(lr: float, betas, eps: float, interval: int) -> dict:
    """Adam settings for a lazily regularised network: lr * c and betas ** c (StyleGAN2)."""
    c = lazy_ratio(interval)
    return {"lr": lr * c, "betas": (float(betas[0]) ** c, float(betas[1]) ** c), "eps": eps}


def _missing(name: str, value: str | None) -> str | None:
    if not value:
        return f"{name} is not set"
    if not Path(value).is_file():
        return f"{name} = {value!r} does not exist"
    return None


def load_lpips_net(
    linear: str | None, backbone: str | None, weight: float, allow_random: bool
) -> tuple[LPIPSVGG | None, bool]:
    """(LPIPS net or None, whether it holds real weights); refuses clearly when a used term lacks files."""
    problems = [p for p in (_missing("lpips_linear", linear), _missing("lpips_backbone", backbone)) if p]
    if not problems:
        from ..inference.metrics.lpips import load_lpips_files

        return load_lpips_files(linear, backbone), True
    if weight <= 0:
        return None, False
    if allow_random:
        log.warning("LPIPS weights missing (%s); using a RANDOM VGG as allowed", "; ".join(problems))
        return LPIPSVGG().eval().requires_grad_(False), False
    expected = "; ".join(f"{k}: {v}" for k, v in LPIPS_CONTENT.items())
    raise FileNotFoundError(
        f"the LPIPS loss (lpips_weight={weight}) needs two local weight files, but {'; '.join(problems)}. "
        f"Expected {expected}. Set both paths in the task config, or set lpips_weight to 0 to train "
        "without the term (allow_random_lpips=true only for tests). Nothing is downloaded."
    )


def load_identity_net(
    path: str | None, weight: float, allow_random: bool
) -> tuple[ArcFaceResNet | None, bool]:
    """(identity net or None, whether it holds real weights); refuses clearly when a used term lacks its file."""
    problem = _missing("arcface", path)
    if problem is None:
        return load_arcface(path), True
    if weight <= 0:
        return None, False
    if allow_random:
        log.warning("identity weights missing (%s); using a RANDOM ResNet-101 as allowed", problem)
        return ArcFaceResNet().eval().requires_grad_(False), False
    raise FileNotFoundError(
        f"the identity loss (id_weight={weight}) needs the ArcFace weights, but {problem}. Expected "
        f"{ARCFACE_CONTENT}. Set 'arcface' in the task config, or set id_weight to 0 to train without "
        "the term (allow_random_identity_net=true only for tests). Nothing is downloaded."
    )
