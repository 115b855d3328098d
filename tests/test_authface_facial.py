"""AuthFace facial loss core: time weight, z0 prediction, latent crops, Gram/GAN terms, plot."""

from __future__ import annotations

import math
import sys
from statistics import NormalDist

import pytest
import torch
from PIL import Image

from priorface.inference.face_align import template_points
from priorface.inference.priors.landmark_mask import eye_mouth_boxes
from priorface.models.authface_discriminator import (
    FacialDiscriminator,
    FacialDiscriminators,
    default_patch_sizes,
    resolve_regions,
)
from priorface.models.authface_facial import (
    crop_regions,
    discriminator_loss,
    facial_loss,
    generator_adv_loss,
    gram_matrix,
    latent_boxes,
    logit_normal_median,
    logit_normal_mode,
    logit_normal_weight,
    normalize_timesteps,
    predict_x0,
    region_boxes,
    scaled_linear_alphas_cumprod,
    style_loss,
    time_weight,
)
from priorface.training.authface_plots import plot_time_weight


def _reference_density(t: float, m: float, s: float) -> float:
    """Normal pdf of logit(t) times the Jacobian d logit / dt = 1 / (t (1 - t))."""
    x = math.log(t / (1.0 - t))
    try:
        from scipy.stats import norm

        pdf = float(norm.pdf(x, loc=m, scale=s))
    except ImportError:
        pdf = NormalDist(m, s).pdf(x)
    return pdf / (t * (1.0 - t))


# ----------------------------------------------------------------------------- time weight


@pytest.mark.parametrize("m,s", [(-0.5, 1.0), (0.0, 1.0), (0.4, 0.6), (-1.0, 1.6)])
def test_weight_matches_independent_density(m, s):
    ts = [0.01, 0.1, 0.28, 0.377, 0.5, 0.7, 0.9, 0.99]
    got = logit_normal_weight(torch.tensor(ts, dtype=torch.float64), m, s)
    want = torch.tensor([_reference_density(t, m, s) for t in ts], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_weight_known_values_and_total_mass():
    # Values measured in shared/reference/papers.md section 2.2c for m=-0.5, s=1.
    t = torch.tensor([0.1, 0.5, 0.7, 0.9, 0.95], dtype=torch.float64)
    w = logit_normal_weight(t)
    torch.testing.assert_close(
        w, torch.tensor([1.05, 1.41, 0.77, 0.12, 0.02], dtype=torch.float64), atol=0.01, rtol=0
    )
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    assert abs(torch.trapezoid(logit_normal_weight(grid), grid).item() - 1.0) < 1e-6


def test_mode_is_near_028_not_037():
    mode = logit_normal_mode(-0.5, 1.0)
    assert abs(mode - 0.28) < 0.01
    # The mode solves d/dt log w = 0  <=>  (logit t - m) / s^2 = 2t - 1.
    assert abs(math.log(mode / (1 - mode)) + 0.5 - (2 * mode - 1)) < 1e-3
    assert abs(logit_normal_weight(torch.tensor(mode, dtype=torch.float64)).item() - 1.79) < 0.01
    assert abs(mode - 0.37) > 0.05


@pytest.mark.parametrize("m,s", [(-0.5, 1.0), (0.3, 0.7)])
def test_median_is_sigmoid_m(m, s):
    med = logit_normal_median(m)
    assert med == pytest.approx(1 / (1 + math.exp(-m)))
    grid = torch.linspace(0, med, 100_001, dtype=torch.float64)
    assert torch.trapezoid(logit_normal_weight(grid, m, s), grid).item() == pytest.approx(0.5, abs=1e-6)


def test_weight_endpoints_are_finite_zero():
    w = logit_normal_weight(normalize_timesteps(torch.tensor([0, 999, 1000])))
    assert torch.isfinite(w).all() and (w >= 0).all() and w[0] < 1e-20 and w[2] < 1e-20


def test_ablation_modes():
    t = torch.tensor([0.05, 0.3, 0.8])
    torch.testing.assert_close(time_weight(t, "constant"), torch.ones(3))
    torch.testing.assert_close(time_weight(t, "none"), torch.zeros(3))
    torch.testing.assert_close(time_weight(t, "time_aware", 0.2, 0.5), logit_normal_weight(t, 0.2, 0.5))
    with pytest.raises(ValueError, match="weight mode"):
        time_weight(t, "linear")
    with pytest.raises(ValueError, match="s must be positive"):
        logit_normal_weight(t, 0.0, 0.0)


# ----------------------------------------------------------------------------- z0 prediction


def test_schedule_matches_sd_scaled_linear():
    abar = scaled_linear_alphas_cumprod()
    assert abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - 0.00085)
    assert abar[-1].item() == pytest.approx(0.00466, abs=2e-5)  # SD's well-known terminal abar


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_q_sample(prediction_type):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    abar = scaled_linear_alphas_cumprod()
    t = torch.tensor([0, 250, 600, 999])
    a = abar[t].sqrt().view(-1, 1, 1, 1)
    b = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    z_t = a * z0 + b * eps
    out = eps if prediction_type == "epsilon" else a * eps - b * z0
    torch.testing.assert_close(predict_x0(z_t, out, abar, t, prediction_type), z0, rtol=1e-10, atol=1e-10)


def test_predict_x0_with_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(
        sched.alphas_cumprod.double(), scaled_linear_alphas_cumprod(), rtol=1e-6, atol=1e-7
    )
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    t = torch.tensor([10, 400, 900])
    z_t = sched.add_noise(z0, eps, t)
    torch.testing.assert_close(predict_x0(z_t, eps, sched.alphas_cumprod, t), z0, rtol=1e-4, atol=2e-4)
    v = sched.get_velocity(z0, eps, t)
    torch.testing.assert_close(
        predict_x0(z_t, v, sched.alphas_cumprod, t, "v_prediction"), z0, rtol=1e-4, atol=1e-4
    )


def test_predict_x0_rejects_bad_input():
    abar = scaled_linear_alphas_cumprod(10)
    z = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="timesteps must lie"):
        predict_x0(z, z, abar, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(z, z, abar, 3, "flow")


# ----------------------------------------------------------------------------- boxes and crops


def test_latent_boxes_round_outward_and_clamp():
    px = torch.tensor([[[17.0, 30.0, 60.0, 71.0], [0.0, 0.0, 3.0, 5.0], [120.5, 100.0, 128.0, 128.0]]])
    got = latent_boxes(px, 128)
    assert got.dtype == torch.long
    assert got.tolist() == [[[2, 3, 8, 9], [0, 0, 1, 1], [15, 12, 16, 16]]]
    outside = torch.tensor(
        [[[-10.0, -5.0, 300.0, 90.0], [128.0, 128.0, 128.0, 128.0], [8.0, 8.0, 16.0, 16.0]]]
    )
    assert latent_boxes(outside, (96, 128)).tolist() == [[[0, 0, 16, 12], [15, 11, 16, 12], [1, 1, 2, 2]]]
    with pytest.raises(ValueError, match="multiple of latent_factor"):
        latent_boxes(px, 100)


def test_crop_takes_exactly_the_box():
    boxes = latent_boxes(torch.tensor([[[17.0, 30.0, 60.0, 71.0]] * 3, [[64.0, 8.0, 100.0, 40.0]] * 3]), 128)
    lat = torch.zeros(2, 4, 16, 16)
    expected = [(2, 3, 8, 9), (8, 1, 13, 5)]  # by hand: floor(x1/8), floor(y1/8), ceil(x2/8), ceil(y2/8)
    for b, (x1, y1, x2, y2) in enumerate(expected):
        assert boxes[b, 0].tolist() == [x1, y1, x2, y2]
        lat[b, :, y1:y2, x1:x2] = 1.0  # marker inside the box only
    for size in [(5, 5), (8, 12), (6, 6)]:
        crop = crop_regions(lat, boxes[:, 0], size)
        assert crop.shape == (2, 4, *size)
        torch.testing.assert_close(crop, torch.ones_like(crop))  # one cell too many would pull in zeros
    # At the box's own size the crop is the plain slice of a position-coded latent.
    coded = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).repeat(2, 4, 1, 1)
    crop = crop_regions(coded, torch.tensor([[2, 3, 8, 9], [2, 3, 8, 9]]), 6)
    torch.testing.assert_close(crop, coded[:, :, 3:9, 2:8])


def test_template_face_boxes_and_eyes_union():
    lm = torch.from_numpy(template_points("ffhq", 256)).float()[None]
    boxes = latent_boxes(eye_mouth_boxes(lm, 256), 256)  # latent 32x32
    px = eye_mouth_boxes(lm, 256)[0]
    for r in range(3):
        x1, y1, x2, y2 = boxes[0, r].tolist()
        assert x1 * 8 <= px[r, 0] < (x1 + 1) * 8 and (x2 - 1) * 8 < px[r, 2] <= x2 * 8
        assert y1 * 8 <= px[r, 1] < (y1 + 1) * 8 and (y2 - 1) * 8 < px[r, 3] <= y2 * 8
    named = region_boxes(boxes, resolve_regions("paired"))
    le, rei = boxes[0, 0].tolist(), boxes[0, 1].tolist()
    assert named["eyes"][0].tolist() == [le[0], min(le[1], rei[1]), rei[2], max(le[3], rei[3])]
    torch.testing.assert_close(named["mouth"], boxes[:, 2])
    assert set(region_boxes(boxes, resolve_regions("separate"))) == {"left_eye", "right_eye", "mouth"}


# ----------------------------------------------------------------------------- Gram and GAN terms


def test_gram_matrix_against_einsum_and_known_value():
    feat = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    want = torch.einsum("bihw,bjhw->bij", feat, feat) / (3 * 4 * 5)
    torch.testing.assert_close(gram_matrix(feat), want)
    torch.testing.assert_close(gram_matrix(torch.ones(1, 2, 2, 2)), torch.full((1, 2, 2), 0.5))
    a, b = [torch.ones(1, 2, 2, 2)], [torch.zeros(1, 2, 2, 2)]
    torch.testing.assert_close(style_loss(a, b), torch.tensor([0.5]))
    torch.testing.assert_close(style_loss(a + a, b + b, [0.5, 1.0]), torch.tensor([0.75]))


def test_stable_adversarial_forms():
    x = torch.linspace(-15, 15, 301, dtype=torch.float64)
    torch.testing.assert_close(generator_adv_loss(x), torch.log(1 - torch.sigmoid(x)))
    torch.testing.assert_close(generator_adv_loss(x, "non_saturating"), -torch.log(torch.sigmoid(x)))
    big = torch.tensor([-1e4, -100.0, 40.0, 100.0, 1e4])
    naive = torch.log(1 - torch.sigmoid(big))
    assert not torch.isfinite(naive).all()  # the naive form overflows in float32
    stable = generator_adv_loss(big)
    assert torch.isfinite(stable).all() and stable[-1].item() == pytest.approx(-1e4)
    assert torch.isfinite(generator_adv_loss(big, "non_saturating")).all()
    # Saturation: at x = -10 the paper's form gives almost no gradient, the non-saturating one ~1.
    x0 = torch.tensor(-10.0, requires_grad=True)
    (g_sat,) = torch.autograd.grad(generator_adv_loss(x0), x0)
    (g_ns,) = torch.autograd.grad(generator_adv_loss(x0, "non_saturating"), x0)
    assert abs(g_sat.item()) < 1e-4 and abs(g_ns.item()) > 0.99


def test_discriminator_shapes_and_configs():
    d = FacialDiscriminator(4, 8)
    logits, feats = d(torch.randn(2, 4, 16, 48))
    assert logits.shape == (2, 1, 4, 12) and [f.shape for f in feats] == [(2, 16, 8, 24), (2, 32, 4, 12)]
    assert FacialDiscriminators().regions == ("eyes", "mouth")
    assert FacialDiscriminators("separate").regions == ("left_eye", "right_eye", "mouth")
    assert default_patch_sizes(128) == {"eyes": (16, 48), "mouth": (32, 32)}
    assert default_patch_sizes(64, "separate") == {"left_eye": (8, 8), "right_eye": (8, 8), "mouth": (16, 16)}
    with pytest.raises(ValueError, match="region"):
        FacialDiscriminators(("eyes", "nose"))
    with pytest.raises(ValueError, match="expected patches"):
        d(torch.randn(1, 3, 8, 8))


def _setup(regions="paired", batch=3):
    torch.manual_seed(0)
    lm = torch.from_numpy(template_points("ffhq", 256)).float()[None].repeat(batch, 1, 1)
    lm[1] += torch.tensor([6.0, -5.0])  # a shifted face: its own boxes
    boxes = latent_boxes(eye_mouth_boxes(lm, 256), 256)
    discs = FacialDiscriminators(regions, channels=8, patch_sizes=default_patch_sizes(32, regions))
    z0_hq = torch.randn(batch, 4, 32, 32)
    z0_pred = (z0_hq + 0.5 * torch.randn(batch, 4, 32, 32)).requires_grad_(True)
    return z0_pred, z0_hq, boxes, discs


@pytest.mark.parametrize("regions", ["paired", "separate"])
def test_facial_loss_finite_differentiable_and_terms_sum(regions):
    z0_pred, z0_hq, boxes, discs = _setup(regions)
    t = torch.tensor([0.1, 0.3, 0.8])
    total, terms = facial_loss(z0_pred, z0_hq, boxes, t, discs, lambda_d=0.5, lambda_s=10.0)
    assert torch.isfinite(total)
    parts = [v for k, v in terms.items() if k != "time_weight"]
    assert len(parts) == 2 * len(discs.regions) and sum(parts) == pytest.approx(total.item(), rel=1e-5)
    total.backward()
    assert z0_pred.grad is not None and torch.isfinite(z0_pred.grad).all() and z0_pred.grad.abs().sum() > 0
    for region in discs.regions:
        grads = [p.grad for p in discs.discs[region].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_facial_loss_weights_each_sample_by_its_time():
    z0_pred, z0_hq, boxes, discs = _setup()
    t = torch.tensor([0.05, 0.3, 0.9])
    total, _ = facial_loss(z0_pred, z0_hq, boxes, t, discs, weight_mode="time_aware", m=-0.2, s=0.8)
    per = [
        facial_loss(
            z0_pred[i : i + 1],
            z0_hq[i : i + 1],
            boxes[i : i + 1],
            t[i : i + 1],
            discs,
            weight_mode="constant",
        )[0]
        for i in range(3)
    ]
    want = (logit_normal_weight(t, -0.2, 0.8) * torch.stack(per)).mean()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-7)
    off, terms = facial_loss(z0_pred, z0_hq, boxes, t, discs, weight_mode="none")
    assert off.item() == 0.0 and terms["time_weight"] == 0.0


def test_style_term_compares_pred_with_hq_crops():
    z0_pred, z0_hq, boxes, discs = _setup("separate")
    t = torch.full((3,), 0.5)
    _, same = facial_loss(z0_hq, z0_hq, boxes, t, discs, weight_mode="constant")
    assert same["mouth_style"] == 0.0 and same["left_eye_style"] == 0.0
    _, terms = facial_loss(z0_pred, z0_hq, boxes, t, discs, lambda_s=3.0, weight_mode="constant")
    # Reference for the mouth: slice each sample's box by hand, resize, Gram via einsum, L1, batch mean.
    size = discs.patch_sizes["mouth"]
    want = 0.0
    for b in range(3):
        x1, y1, x2, y2 = boxes[b, 2].tolist()
        feats = []
        for z in (z0_pred, z0_hq):
            patch = torch.nn.functional.interpolate(
                z[b : b + 1, :, y1:y2, x1:x2].detach(), size=size, mode="bilinear", antialias=True
            )
            feats.append(discs.discs["mouth"](patch)[1])
        for fp, fr in zip(*feats, strict=True):
            n = fp[0].numel()
            gp, gr = (torch.einsum("chw,dhw->cd", f[0], f[0]) / n for f in (fp, fr))
            want += (gp - gr).abs().mean().item() / 3
    assert terms["mouth_style"] == pytest.approx(3.0 * want, rel=1e-4)


def test_discriminator_loss_trains_discs_only():
    z0_pred, z0_hq, boxes, discs = _setup("separate")
    total, terms = discriminator_loss(z0_pred, z0_hq, boxes, discs)
    assert torch.isfinite(total) and set(terms) >= {"mouth_d", "left_eye_real_acc"}
    # A fresh discriminator is near chance: each region's loss is about 2 log 2.
    assert terms["mouth_d"] == pytest.approx(2 * math.log(2), abs=0.3)
    total.backward()
    assert z0_pred.grad is None  # fake patches are detached
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in discs.parameters())
    zero, _ = discriminator_loss(z0_pred, z0_hq, boxes, discs, sample_weight=torch.zeros(3))
    assert zero.item() == 0.0


# ----------------------------------------------------------------------------- plot


def test_plot_time_weight_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_time_weight(tmp_path / "w.png", -0.5, 1.0)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_plot_time_weight_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = plot_time_weight(tmp_path / "w.png", 0.0, 0.7)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 400)
        assert len(img.convert("RGB").getcolors(1 << 20)) > 3  # curve and markers drawn, not blank
