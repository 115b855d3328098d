"""AuthFace's time-aware latent facial feature loss, in plain torch (no I/O).

AuthFace (arXiv 2410.09864, no public code) fine-tunes SDXL on faces and adds, on top of the
diffusion loss, an eye/mouth loss computed in *latent* space on the predicted clean latent::

    L_facial = w(t) * sum_regions [ lambda_d * log(1 - D_r(p_pred)) + lambda_s * Style(D_r; p_pred, p_hq) ]

where ``p_pred``/``p_hq`` are the region crops of ``z0_pred`` (from :func:`predict_x0`) and of the
clean HQ latent, ``D_r`` a per-region discriminator (models/authface_discriminator.py), ``Style``
the L1 distance between Gram matrices of the discriminator's features (GFPGAN's component style
loss) and ``w(t)`` a logit-normal density over the normalised timestep (:func:`time_weight`).

Typical generator step (``boxes_px`` from ``inference.priors.landmark_mask.eye_mouth_boxes``)::

    z0_pred = predict_x0(z_t, eps_pred, scheduler.alphas_cumprod, timesteps)
    boxes = latent_boxes(boxes_px, image_size=1024)
    loss, terms = facial_loss(z0_pred, z0_hq, boxes, normalize_timesteps(timesteps), discs)

and the discriminator step: ``discriminator_loss(z0_pred.detach(), z0_hq, boxes, discs)``.
``z0_pred`` and ``z0_hq`` must be in the same latent space (both VAE latents times the VAE's
scaling factor, 0.13025 for SDXL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .authface_discriminator import FacialDiscriminators

WEIGHT_MODES = ("time_aware", "constant", "none")
ADV_MODES = ("saturating", "non_saturating")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# t is clamped to [T_EPS, 1 - T_EPS] before taking logit(t): at t = 0 or 1 the formula is 0 * inf
# (NaN) while the density's true limit is 0; at 1e-6 the density is already below 1e-20, so the
# clamp only removes the NaN. It matters for t = timestep / 1000 with timestep 0.
T_EPS = 1e-6


def normalize_timesteps(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Integer diffusion timesteps -> t = timestep / num_train_timesteps as float (t in [0, 1))."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    return torch.as_tensor(timesteps).float() / num_train_timesteps


def logit_normal_weight(t: torch.Tensor, m: float = -0.5, s: float = 1.0) -> torch.Tensor:
    """Logit-normal density at t in (0, 1): exp(-(logit t - m)^2 / 2s^2) / (s sqrt(2 pi) t (1 - t)).

    ``t`` is clamped to ``[T_EPS, 1 - T_EPS]`` (see :data:`T_EPS`), so t = 0 and t = 1 give ~0
    instead of NaN. Note on the paper: AuthFace says this weight "peaks at t = 0.37" for m = -0.5,
    s = 1, but the density's mode there is t ~ 0.28 (w ~ 1.79); 0.377 = sigmoid(m) is the
    *median* (half the mass below it). The density integrates to 1 over (0, 1), so its mean over a
    uniform t is 1 and the loss scale matches a constant weight of 1 on average.
    """
    if s <= 0:
        raise ValueError(f"s must be positive, got {s}")
    t = torch.as_tensor(t)
    t = (t if t.is_floating_point() else t.float()).clamp(T_EPS, 1.0 - T_EPS)
    logit = torch.log(t) - torch.log1p(-t)
    z = (logit - m) / s
    return torch.exp(-0.5 * z * z) / (s * math.sqrt(2.0 * math.pi) * t * (1.0 - t))


def logit_normal_median(m: float = -0.5) -> float:
    """Median of the logit-normal distribution: sigmoid(m) (0.3775 for m = -0.5)."""
    return 1.0 / (1.0 + math.exp(-m))


def logit_normal_mode(m: float = -0.5, s: float = 1.0, points: int = 200_001) -> float:
    """Mode of the logit-normal density, found on a dense grid of t (resolution 1 / (points - 1))."""
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)[1:-1]
    return float(t[torch.argmax(logit_normal_weight(t, m, s))])


def time_weight(t: torch.Tensor, mode: str = "time_aware", m: float = -0.5, s: float = 1.0) -> torch.Tensor:
    """Per-sample weight of the facial loss: "time_aware" (logit-normal), "constant" (1) or "none" (0).

    The three modes are AuthFace's Table 2 ablation; m and s are its Table 4 sweep.
    """
    t = torch.as_tensor(t)
    t = t if t.is_floating_point() else t.float()
    if mode == "time_aware":
        return logit_normal_weight(t, m, s)
    if mode == "constant":
        return torch.ones_like(t)
    if mode == "none":
        return torch.zeros_like(t)
    raise ValueError(f"unknown weight mode {mode!r}; expected one of {', '.join(WEIGHT_MODES)}")


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """SD/SDXL "scaled_linear" schedule: betas = linspace(sqrt(b0), sqrt(b1))^2; returns abar [T] float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def predict_x0(
    z_t: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor | int,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Closed-form clean latent from a noisy latent and the UNet output at integer timesteps ``t``.

    With z_t = sqrt(abar) z0 + sqrt(1 - abar) eps (DDPM forward process):

    * "epsilon" (SDXL base): z0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar);
    * "v_prediction" (v = sqrt(abar) eps - sqrt(1 - abar) z0): z0 = sqrt(abar) z_t - sqrt(1 - abar) v;
    * "sample": the output already is z0.

    With epsilon, errors in eps are amplified by sqrt((1 - abar) / abar) (~14.6 at SDXL's t = 999);
    the time weight is ~0 there. ``t`` indexes ``alphas_cumprod`` ([T]); one value or one per sample.
    """
    if z_t.shape != model_output.shape:
        raise ValueError(
            f"z_t and model_output shapes differ: {tuple(z_t.shape)} vs {tuple(model_output.shape)}"
        )
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if prediction_type == "sample":
        return model_output
    t = torch.as_tensor(t, device=alphas_cumprod.device).long().reshape(-1)
    if t.numel() not in (1, z_t.shape[0]):
        raise ValueError(f"t must hold 1 or {z_t.shape[0]} timesteps, got {t.numel()}")
    if int(t.min()) < 0 or int(t.max()) >= alphas_cumprod.shape[0]:
        raise ValueError(f"timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}], got {t.tolist()}")
    # Coefficients in float64 (then the latent's dtype): sqrt(1 - abar) loses digits in fp16 near t=0.
    abar = alphas_cumprod.double()[t].to(z_t.device).reshape(-1, *([1] * (z_t.dim() - 1)))
    a, b = abar.sqrt().to(z_t.dtype), (1.0 - abar).sqrt().to(z_t.dtype)
    if prediction_type == "epsilon":
        return (z_t - b * model_output) / a
    return a * z_t - b * model_output


def latent_boxes(
    landmark_boxes_px: torch.Tensor, image_size: int | tuple[int, int], latent_factor: int = 8
) -> torch.Tensor:
    """Pixel boxes ``[B,R,4]`` (x1, y1, x2, y2) -> integer latent boxes ``[B,R,4]``, half-open.

    Latent cell j covers pixels [j * f, (j + 1) * f); a box becomes floor(x1 / f) .. ceil(x2 / f)
    (rounded outward, so the whole pixel box is inside), clamped to the latent and at least one
    cell wide. Slice with ``latents[..., y1:y2, x1:x2]``. Boxes are in edge coordinates of the
    crop (0..W), as ``eye_mouth_boxes`` returns them; order (left eye, right eye, mouth).
    """
    boxes = torch.as_tensor(landmark_boxes_px, dtype=torch.float64)
    if boxes.dim() == 2:
        boxes = boxes.unsqueeze(0)
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [B,R,4], got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite values")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if latent_factor < 1 or h % latent_factor or w % latent_factor:
        raise ValueError(f"image size {h}x{w} must be a multiple of latent_factor {latent_factor}")
    lh, lw = h // latent_factor, w // latent_factor
    lo = torch.floor(boxes[..., :2] / latent_factor)
    hi = torch.ceil(boxes[..., 2:] / latent_factor)
    limit = torch.tensor([lw, lh], dtype=torch.float64)
    lo = torch.minimum(lo.clamp_min(0), limit - 1)
    hi = torch.minimum(torch.maximum(hi, lo + 1), limit)
    return torch.cat([lo, hi], dim=-1).long()


def region_boxes(boxes_latent: torch.Tensor, regions: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Latent boxes ``[B,3,4]`` (left eye, right eye, mouth) -> {region: [B,4]}; "eyes" = union of both."""
    if boxes_latent.dim() != 3 or boxes_latent.shape[1:] != (3, 4):
        raise ValueError(
            f"boxes must have shape [B,3,4] (left eye, right eye, mouth), got {tuple(boxes_latent.shape)}"
        )
    named = {"left_eye": boxes_latent[:, 0], "right_eye": boxes_latent[:, 1], "mouth": boxes_latent[:, 2]}
    lo = torch.minimum(named["left_eye"][:, :2], named["right_eye"][:, :2])
    hi = torch.maximum(named["left_eye"][:, 2:], named["right_eye"][:, 2:])
    named["eyes"] = torch.cat([lo, hi], dim=1)
    unknown = [r for r in regions if r not in named]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; expected names from {sorted(named)}")
    return {r: named[r] for r in regions}


def crop_regions(latents: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop box ``boxes[b]`` (half-open ints, [B,4]) of each sample and resize to ``size``: [B,C,h,w].

    Plain slicing plus bilinear resampling (antialiased when shrinking), differentiable in the
    latents; a crop already of the target size is returned unresampled.
    """
    oh, ow = (size, size) if isinstance(size, int) else size
    if latents.dim() != 4 or boxes.shape != (latents.shape[0], 4):
        raise ValueError(
            f"expected latents [B,C,H,W] and boxes [B,4], got {tuple(latents.shape)}, {tuple(boxes.shape)}"
        )
    out = []
    for b, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if not (0 <= x1 < x2 <= latents.shape[-1] and 0 <= y1 < y2 <= latents.shape[-2]):
            raise ValueError(
                f"box {b} {(x1, y1, x2, y2)} is empty or outside the latent {tuple(latents.shape[-2:])}"
            )
        patch = latents[b : b + 1, :, y1:y2, x1:x2]
        if patch.shape[-2:] != (oh, ow):
            shrink = patch.shape[-2] > oh or patch.shape[-1] > ow
            patch = F.interpolate(
                patch, size=(oh, ow), mode="bilinear", align_corners=False, antialias=shrink
            )
        out.append(patch)
    return torch.cat(out, dim=0)


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``[B,C,C]`` of features ``[B,C,H,W]``, normalised by C*H*W (as GFPGAN)."""
    n, c, h, w = feat.shape
    f = feat.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def style_loss(
    feats_pred: list[torch.Tensor], feats_real: list[torch.Tensor], scale_weights: list[float] | None = None
) -> torch.Tensor:
    """Per-sample ``[B]`` sum over scales of the mean L1 distance between Gram matrices.

    ``scale_weights`` default to 1 per scale; GFPGAN weights its two scales (0.5, 1.0).
    The real features are used as given; detach them (or compute them without grad) for a target.
    """
    if len(feats_pred) != len(feats_real):
        raise ValueError(f"got {len(feats_pred)} predicted and {len(feats_real)} real feature maps")
    weights = [1.0] * len(feats_pred) if scale_weights is None else list(scale_weights)
    if len(weights) != len(feats_pred):
        raise ValueError(f"scale_weights has {len(weights)} entries for {len(feats_pred)} scales")
    total = 0.0
    for wgt, fp, fr in zip(weights, feats_pred, feats_real, strict=True):
        total = total + wgt * (gram_matrix(fp) - gram_matrix(fr)).abs().mean(dim=(1, 2))
    return total


def generator_adv_loss(fake_logits: torch.Tensor, mode: str = "saturating") -> torch.Tensor:
    """Elementwise generator GAN term from discriminator logits x (D = sigmoid(x)).

    "saturating" (the paper's form, the default): log(1 - D) = -softplus(x), minimised. It
    saturates: its gradient -sigmoid(x) vanishes when D confidently rejects the fake (x << 0),
    which is exactly early in training. It is also unbounded below as D is fooled.
    "non_saturating": -log D = softplus(-x), the usual fix (same fixed point, strong early gradient).
    Both are written with softplus, so they stay finite for any logit.
    """
    if mode == "saturating":
        return -F.softplus(fake_logits)
    if mode == "non_saturating":
        return F.softplus(-fake_logits)
    raise ValueError(f"unknown adversarial mode {mode!r}; expected one of {ADV_MODES}")


def discriminator_adv_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``[B]`` vanilla GAN loss of a discriminator: -log D(real) - log(1 - D(fake))."""
    return F.softplus(-real_logits).flatten(1).mean(1) + F.softplus(fake_logits).flatten(1).mean(1)


def _check_pair(z0_pred: torch.Tensor, z0_hq: torch.Tensor, boxes_latent: torch.Tensor) -> None:
    if z0_pred.shape != z0_hq.shape or z0_pred.dim() != 4:
        raise ValueError(
            f"z0_pred and z0_hq must be [B,C,H,W] of one shape, got {tuple(z0_pred.shape)}, {tuple(z0_hq.shape)}"
        )
    if boxes_latent.shape != (z0_pred.shape[0], 3, 4):
        raise ValueError(f"boxes_latent must be [{z0_pred.shape[0]},3,4], got {tuple(boxes_latent.shape)}")


def facial_loss(
    z0_pred: torch.Tensor,
    z0_hq: torch.Tensor,
    boxes_latent: torch.Tensor,
    t_norm: torch.Tensor,
    discs: FacialDiscriminators,
    lambda_d: float = 1.0,
    lambda_s: float = 200.0,
    weight_mode: str = "time_aware",
    m: float = -0.5,
    s: float = 1.0,
    adv_mode: str = "saturating",
    scale_weights: list[float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Generator-side facial loss and its parts: (total, {"<region>_adv", "<region>_style", "time_weight"}).

    Per sample b: w(t_b) * sum_r [lambda_d * mean(adv(D_r(p_pred))) + lambda_s * Style_r], then the
    batch mean. The logged parts are the same weighted batch means, so they sum to the total.
    Defaults lambda_d = 1, lambda_s = 200 are GFPGAN's component weights; AuthFace's are
    unpublished, so calibrate them against the diffusion loss. Real-patch features are computed
    without gradient (they are the target); gradients reach ``z0_pred`` and the discriminators
    (freeze the discriminators in the generator step if they must not move).
    """
    _check_pair(z0_pred, z0_hq, boxes_latent)
    w = time_weight(t_norm, weight_mode, m, s).to(z0_pred.device, z0_pred.dtype).reshape(-1)
    if w.numel() == 1:
        w = w.expand(z0_pred.shape[0])
    if w.numel() != z0_pred.shape[0]:
        raise ValueError(f"t_norm must hold 1 or {z0_pred.shape[0]} values, got {w.numel()}")
    total = z0_pred.new_zeros(())
    terms: dict[str, float] = {"time_weight": float(w.mean())}
    for region, box in region_boxes(boxes_latent, discs.regions).items():
        size = discs.patch_sizes[region]
        logits, feats_pred = discs(region, crop_regions(z0_pred, box, size))
        with torch.no_grad():
            _, feats_real = discs(region, crop_regions(z0_hq, box, size))
        adv = generator_adv_loss(logits, adv_mode).flatten(1).mean(1)
        style = style_loss(feats_pred, feats_real, scale_weights)
        adv_term = (w * lambda_d * adv).mean()
        style_term = (w * lambda_s * style).mean()
        total = total + adv_term + style_term
        terms[f"{region}_adv"] = float(adv_term.detach())
        terms[f"{region}_style"] = float(style_term.detach())
    return total, terms


def discriminator_loss(
    z0_pred: torch.Tensor,
    z0_hq: torch.Tensor,
    boxes_latent: torch.Tensor,
    discs: FacialDiscriminators,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Discriminator loss summed over regions: softplus(-D(real)) + softplus(D(fake.detach())).

    ``z0_pred`` is detached here. ``sample_weight`` ([B], optional) weights samples, e.g. by the
    time weight so that pure-noise predictions do not dominate; by default all count equally.
    Returns (total, {"<region>_d": value, "<region>_real_acc": share of real patches scored > 0}).
    """
    _check_pair(z0_pred, z0_hq, boxes_latent)
    total = z0_pred.new_zeros(())
    terms: dict[str, float] = {}
    for region, box in region_boxes(boxes_latent, discs.regions).items():
        size = discs.patch_sizes[region]
        real_logits, _ = discs(region, crop_regions(z0_hq, box, size))
        fake_logits, _ = discs(region, crop_regions(z0_pred.detach(), box, size))
        per_sample = discriminator_adv_loss(real_logits, fake_logits)
        if sample_weight is not None:
            per_sample = per_sample * sample_weight.to(per_sample).reshape(-1)
        loss = per_sample.mean()
        total = total + loss
        terms[f"{region}_d"] = float(loss.detach())
        terms[f"{region}_real_acc"] = float((real_logits.detach() > 0).float().mean())
    return total, terms
