"""XPSR Degradation-Free Constraint (DFC): L1 between ControlNet head outputs and resized HR targets.

Heads (models/xpsr_controlnet.py): three RGB images from the conditioning embedding at 1/2, 1/4 and
1/8 of the control image, and one latent prediction per ControlNet zero-conv output (12 + mid for
SD1.5, at latent sizes 64/32/16/8 for a 512 px image). Targets: the HR image in [-1, 1] and the HR
latent (``VAE(HR) * 0.18215``, the same latent the diffusion loss noises), each bilinearly resized
(``align_corners=False``, no antialias, as the official train.py) to the head's size.

- ``"official"`` (qyp2000/XPSR train.py): 3 pixel terms + 12 latent terms + the mid latent term.
- ``"paper"``: 3 pixel terms + 3 latent terms. Which three latent heads is not stated; our reading
  takes the last resnet+attention output of each Semantic-Fusion block (down blocks 0-2), i.e. the
  SFA-fused features at latent scales 1, 1/2 and 1/4, which mirror the three RGB scales. For SD1.5
  (2 layers per block, 12 residuals) these are residuals 2, 5 and 8 (:data:`PAPER_LATENT_HEADS`).

Every term is a mean L1 and is weighted by ``weight`` (lambda_d = 0.05 in the official code; PASD
used 1.0 for its RGB terms). The total is added to the diffusion MSE loss by the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DFC_WEIGHT = 0.05
DFC_MODES = ("official", "paper")
PAPER_LATENT_HEADS = (2, 5, 8)  # see the module docstring: last SFA output of down blocks 0, 1, 2


@dataclass
class DFCLoss:
    """Weighted total and the unweighted per-head L1 terms (for logging)."""

    total: torch.Tensor  # weight * (sum of pixel terms + sum of latent terms), a scalar
    pixel_terms: tuple[torch.Tensor, ...]  # one scalar per RGB head, finest first
    latent_terms: tuple[torch.Tensor, ...]  # one scalar per latent head used (official: 12 + mid, last = mid)
    weight: float


def resized_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between ``pred`` and ``target`` bilinearly resized to ``pred``'s height and width."""
    if pred.shape[:2] != target.shape[:2]:
        raise ValueError(
            f"head output {tuple(pred.shape)} and target {tuple(target.shape)} differ in batch/channels"
        )
    resized = F.interpolate(target.float(), size=pred.shape[-2:], mode="bilinear", align_corners=False)
    return F.l1_loss(pred.float(), resized)


def dfc_loss(
    rgbs: Sequence[torch.Tensor],
    latent_preds: Sequence[torch.Tensor],
    latent_pred_mid: torch.Tensor,
    hr_pixels: torch.Tensor,
    hr_latents: torch.Tensor,
    mode: str = "official",
    weight: float = DFC_WEIGHT,
    paper_latent_heads: Sequence[int] = PAPER_LATENT_HEADS,
) -> DFCLoss:
    """DFC loss from an XPSRControlNetOutput's heads; ``hr_pixels`` (B,3,H,W) in [-1,1], ``hr_latents`` (B,4,h,w)."""
    if mode not in DFC_MODES:
        raise ValueError(f"unknown DFC mode {mode!r}; expected one of {DFC_MODES}")
    if hr_pixels.ndim != 4 or hr_pixels.shape[1] != 3:
        raise ValueError(f"hr_pixels must be (B, 3, H, W) in [-1, 1], got shape {tuple(hr_pixels.shape)}")
    if hr_latents.ndim != 4:
        raise ValueError(f"hr_latents must be (B, C, h, w), got shape {tuple(hr_latents.shape)}")
    if mode == "official":
        heads = [*latent_preds, latent_pred_mid]
    else:
        bad = [i for i in paper_latent_heads if not 0 <= i < len(latent_preds)]
        if bad:
            raise ValueError(f"paper_latent_heads {bad} out of range for {len(latent_preds)} latent heads")
        heads = [latent_preds[i] for i in paper_latent_heads]
    pixel_terms = tuple(resized_l1(rgb, hr_pixels) for rgb in rgbs)
    latent_terms = tuple(resized_l1(pred, hr_latents) for pred in heads)
    total = weight * torch.stack([*pixel_terms, *latent_terms]).sum()
    return DFCLoss(total, pixel_terms, latent_terms, weight)
