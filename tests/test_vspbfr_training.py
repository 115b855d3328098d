"""VSPBFR trainers: discriminator and ArcFace layouts, GAN/R1 maths, blind data, both stages on tiny nets."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from priorface.inference import progress
from priorface.inference.images import save_image_file
from priorface.models.arcface_resnet import (
    ArcFaceConfig,
    ArcFaceResNet,
    identity_embedding,
    identity_loss,
    load_arcface,
)
from priorface.models.checkpoint import read_checkpoint
from priorface.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from priorface.models.vspbfr_checkpoints import (
    StyleCodec,
    load_code_diffuser,
    load_restoration_net,
    save_code_diffuser,
    save_style_codec,
)
from priorface.models.vspbfr_diffuser import CodeDiffuser, CodeDiffuserConfig
from priorface.models.vspbfr_discriminator import (
    DiscriminatorConfig,
    VSPBFRDiscriminator,
    discriminator_from_state_dict,
    minibatch_stddev,
)
from priorface.models.vspbfr_encoder import E4EConfig, StyleEncoder
from priorface.models.vspbfr_restore import RestorationConfig, RestorationNet
from priorface.training.datasets import FaceDatasetConfig
from priorface.training.loop import TrainConfig, train
from priorface.training.vspbfr_data import STAGE1_SETTINGS, BlindFaceDataset, BlindSettings
from priorface.training.vspbfr_losses import d_logistic_loss, lazy_adam_settings, r1_penalty
from priorface.training.vspbfr_tasks import (
    CodeDiffuserTask,
    CodeDiffuserTaskConfig,
    RestorationTask,
    RestorationTaskConfig,
    build_vspbfr_task,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

REPO = Path(__file__).resolve().parents[1]
TINY_NET = {"style_dim": 32, "n_mlp": 2, "channel_divisor": 16}
TINY_ARC = ArcFaceConfig(layers=(1, 1, 1, 1), base_width=8, embedding_dim=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Tiny frozen codec and code diffuser, a tiny ArcFace .pth and six smooth 48 px 'faces'."""
    root = tmp_path_factory.mktemp("vspbfr")
    torch.manual_seed(0)
    enc = StyleEncoder(
        E4EConfig(input_size=64, units=(1, 1, 1, 1), widths=(8, 16, 24, 32), num_styles=8, se_reduction=4)
    )
    enc.set_latent_avg(torch.randn(8, 32))  # real W+ codes are O(1): dominated by the average code
    dec = StyleGAN2Generator(StyleGAN2Config(size=32, **TINY_NET))
    save_style_codec(StyleCodec(enc, dec, {}), root / "codec.safetensors")
    save_code_diffuser(CodeDiffuser(CodeDiffuserConfig(dim=32, blocks=2)), root / "diffuser.safetensors")
    torch.save(ArcFaceResNet(TINY_ARC).state_dict(), root / "Arcface.pth")
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        low = torch.rand(1, 3, 4, 4, generator=g)
        save_image_file(
            F.interpolate(low, size=48, mode="bicubic").clamp(0, 1)[0], root / "faces" / f"{i}.png"
        )
    return {
        "train_dirs": [str(root / "faces")],
        "style_codec": str(root / "codec.safetensors"),
        "arcface": str(root / "Arcface.pth"),
        "diffuser": str(root / "diffuser.safetensors"),
        "root": str(root),
    }


def _stage1(files, **kw) -> CodeDiffuserTaskConfig:
    base = dict(
        train_dirs=files["train_dirs"],
        style_codec=files["style_codec"],
        arcface=files["arcface"],
        size=32,
        diffuser={"blocks": 2},
        lpips_weight=0.0,
    )
    return CodeDiffuserTaskConfig(**{**base, **kw})


def _stage2(files, **kw) -> RestorationTaskConfig:
    base = dict(
        train_dirs=files["train_dirs"],
        style_codec=files["style_codec"],
        code_diffuser=files["diffuser"],
        arcface=files["arcface"],
        size=32,
        model=TINY_NET,
        discriminator={"channel_divisor": 16},
        lpips_weight=0.0,
        r1_every=2,
    )
    return RestorationTaskConfig(**{**base, **kw})


def _train_cfg(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), steps=4, batch_size=2, lr=1.6e-3, betas=(0.0, 0.99**0.8))
    base.update(log_every=1, val_every=100, ckpt_every=1, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- discriminator


def _official_discriminator_keys(size: int, multiplier: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official RestoreNet.Discriminator, written out from its structure."""
    ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * multiplier, 128: 128 * multiplier}
    ch.update({256: 64 * multiplier, 512: 32 * multiplier, 1024: 16 * multiplier})
    keys = {"encoder_input_convs.0.weight": (ch[size], 3, 1, 1), "encoder_input_convs.1.bias": (ch[size],)}
    in_ch = ch[size]
    for i, log_res in enumerate(range(int(math.log2(size)), 2, -1)):
        out = ch[2 ** (log_res - 1)]
        p = f"encoder_convs.{i}"
        keys.update(
            {
                f"{p}.conv1.0.weight": (in_ch, in_ch, 3, 3),
                f"{p}.conv1.1.bias": (in_ch,),
                f"{p}.conv2.0.kernel": (4, 4),  # Blur buffer (persistent in rosinality)
                f"{p}.conv2.1.weight": (out, in_ch, 3, 3),
                f"{p}.conv2.2.bias": (out,),
                f"{p}.skip.0.kernel": (4, 4),
                f"{p}.skip.1.weight": (out, in_ch, 1, 1),
            }
        )
        in_ch = out
    keys.update(
        {
            "final_conv.0.weight": (512, 513, 3, 3),
            "final_conv.1.bias": (512,),
            "final_linear.0.weight": (512, 512 * 16),
            "final_linear.0.bias": (512,),
            "final_linear.1.weight": (1, 512),
            "final_linear.1.bias": (1,),
        }
    )
    return keys


def test_discriminator_keys_match_the_official_layout():
    with torch.device("meta"):
        d = VSPBFRDiscriminator()
    got = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert got == _official_discriminator_keys(512, 2)
    params = sum(p.numel() for p in d.parameters())
    assert round(params / 1e6, 2) == 28.98  # papers.md: 28.98 M, measured on the official class


def test_discriminator_loads_official_entry_and_minibatch_stddev():
    torch.manual_seed(1)
    d = VSPBFRDiscriminator(DiscriminatorConfig(size=32, channel_divisor=16))
    sd = {f"module.{k}": v for k, v in d.state_dict().items()}  # DDP-saved 'd' entry
    loaded = discriminator_from_state_dict(sd, "test")
    assert loaded.config == d.config
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded(x), d(x)) and d(x).shape == (4, 1)
    # Group of 2 over a batch of 4: sample i pairs with sample i +- 2 (view(group, -1, ...)).
    f = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    out = minibatch_stddev(f, 2)
    for i in range(4):
        pair = torch.stack([f[i % 2], f[i % 2 + 2]])
        want = torch.sqrt(pair.var(0, unbiased=False) + 1e-8).mean()
        assert torch.allclose(out[i, 3], want.expand(2, 2))
    with pytest.raises(ValueError, match="multiple of the stddev group"):
        minibatch_stddev(torch.randn(6, 3, 2, 2), 4)


# ---------------------------------------------------------------- identity network


def test_arcface_matches_torchvision_resnet101_layout_and_output(tmp_path):
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours, ref = ArcFaceResNet(), tv.models.resnet101(num_classes=256)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    torch.manual_seed(2)
    small = tv.models.resnet.ResNet(tv.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=16).eval()
    torch.save(small.state_dict(), tmp_path / "Arcface.pth")
    net = load_arcface(tmp_path / "Arcface.pth")  # weights_only read, config inferred from shapes
    assert net.config == ArcFaceConfig(layers=(1, 1, 1, 1), embedding_dim=16, base_width=64)
    x = torch.randn(2, 3, 112, 112)
    assert torch.allclose(net(x), small(x), atol=1e-5)


def test_identity_loss_is_one_minus_cosine_at_112():
    torch.manual_seed(3)
    net = ArcFaceResNet(TINY_ARC).eval()
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    a.requires_grad_(True)
    loss = identity_loss(net, a, b)
    ea = net(F.interpolate(a, size=(112, 112), mode="bilinear", align_corners=False))
    eb = net(F.interpolate(b, size=(112, 112), mode="bilinear", align_corners=False))
    want = (1 - F.cosine_similarity(ea, eb, dim=1)).abs().mean()
    assert torch.allclose(loss, want, atol=1e-6)
    assert identity_loss(net, b, b).item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert torch.allclose(identity_embedding(net, b).norm(dim=1), torch.ones(2))


# ---------------------------------------------------------------- GAN maths


class _ToyD(torch.nn.Module):
    """D(x) = sum(w * x^2) per image: dD/dx = 2 w x, so the R1 penalty has a closed form."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 3 * 4 * 4).reshape(1, 3, 4, 4))

    def forward(self, x):
        return (self.w * x**2).flatten(1).sum(1, keepdim=True)


def test_r1_penalty_equals_the_closed_form():
    d, x = _ToyD(), torch.randn(3, 3, 4, 4, requires_grad=True)
    penalty = r1_penalty(d(x), x)
    want = ((2 * d.w * x) ** 2).flatten(1).sum(1).mean()
    assert torch.allclose(penalty, want)
    penalty.backward()  # differentiable (create_graph): d/dw = mean_i sum 8 w x_i^2
    assert torch.allclose(d.w.grad, (8 * d.w * x**2).mean(0, keepdim=True).detach())


def test_r1_is_applied_every_16th_step_with_the_lazy_weight(files):
    task = RestorationTask(_stage2(files, r1_every=16))
    task.discriminator = _ToyD()
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    applied = []
    for step in range(33):
        loss, logs = task.aux_loss(None, {"hq": real, "fake": fake}, step)
        base = d_logistic_loss(task.discriminator(real), task.discriminator(fake))
        if "r1" in logs:
            applied.append(step)
            x = real.clone().requires_grad_(True)
            direct = ((2 * task.discriminator.w * x) ** 2).flatten(1).sum(1).mean()
            assert logs["r1"] == pytest.approx(direct.item(), rel=1e-5)
            assert loss.item() == pytest.approx((base + 10.0 / 2 * 16 * direct).item(), rel=1e-5)
        else:
            assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    assert applied == [0, 16, 32]


def test_adam_settings_and_job_files_carry_the_official_hyperparameters():
    task = RestorationTask(RestorationTaskConfig(train_dirs=["x"], style_codec="c", code_diffuser="d"))
    got = task.aux_optimizer_settings(TrainConfig(out_dir="x", lr=123.0, eps=1e-8))
    c = 16 / 17
    assert got["lr"] == pytest.approx(0.002 * c) and got["eps"] == 1e-8
    assert got["betas"] == pytest.approx((0.0, 0.99**c))
    assert lazy_adam_settings(1.0, (0.5, 0.9), 1e-8, 4)["betas"] == pytest.approx((0.5**0.8, 0.9**0.8))
    jobs = {
        name: json.loads((REPO / "configs" / "vspbfr" / f"{name}.json").read_text())
        for name in ("stage1", "stage2")
    }
    for job in jobs.values():
        assert job["train"]["lr"] == pytest.approx(0.002 * 4 / 5)
        assert job["train"]["betas"] == pytest.approx([0.0, 0.99**0.8])
        TrainConfig(**job["train"])
        build_vspbfr_task(job["task"], job["task_config"])  # every field is a known config field
    s1, s2 = jobs["stage1"], jobs["stage2"]
    assert (s1["train"]["batch_size"], s1["task_config"]["size"], s1["train"]["steps"]) == (16, 256, 200000)
    assert (s1["task_config"]["lpips_weight"], s1["task_config"]["id_weight"]) == (0.1, 0.1)
    assert (s2["train"]["batch_size"], s2["task_config"]["size"], s2["train"]["steps"]) == (4, 512, 500000)
    assert (s2["task_config"]["lpips_weight"], s2["task_config"]["id_weight"]) == (0.5, 0.1)
    assert (s2["task_config"]["r1_weight"], s2["task_config"]["r1_every"]) == (10.0, 16)
    assert s2["train"]["ema_decay"] == pytest.approx(0.5 ** (32 / 10000))


# ---------------------------------------------------------------- weights files


def test_missing_loss_weights_are_refused_with_a_clear_message(files, tmp_path):
    dev, tcfg = torch.device("cpu"), _train_cfg(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        CodeDiffuserTask(_stage1(files, lpips_weight=0.1)).setup(dev, tcfg)
    msg = str(e.value)
    assert all(
        s in msg for s in ("lpips_linear is not set", "vgg.pth", "vgg16-397923af.pth", "lpips_weight to 0")
    )
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError) as e:
        RestorationTask(_stage2(files, arcface=missing)).setup(dev, tcfg)
    msg = str(e.value)
    assert all(
        s in msg for s in (missing, "Arcface.pth", "resnet101", "id_weight to 0", "allow_random_identity_net")
    )
    with pytest.raises(FileNotFoundError, match="code_diffuser"):
        RestorationTask(_stage2(files, code_diffuser=missing)).setup(dev, tcfg)
    task = CodeDiffuserTask(_stage1(files, arcface=None, id_weight=0.0))  # explicit opt-out: no net loaded
    task.setup(dev, tcfg)
    assert task.idnet is None and task.lpips is None


# ---------------------------------------------------------------- data


def test_blind_dataset_stage_settings(files):
    def make(**kw):
        cfg = FaceDatasetConfig(hq_dirs=files["train_dirs"], size=32, degradation="blind", split="all")
        return BlindFaceDataset(cfg, BlindSettings(**kw))

    stage1 = make(**STAGE1_SETTINGS)
    a, b = stage1[1], stage1[1]
    assert torch.equal(a["lq"], b["lq"]) and a["lq"].shape == (3, 32, 32)
    params = json.loads(a["degradation"])
    assert params["haze_alpha"] is None and not params["gray"] and "hflip" not in params
    stage1.set_epoch(1)
    assert not torch.equal(stage1[1]["lq"], a["lq"]), "a new epoch must draw a new degradation"
    gray = make(gray_prob=1.0, hflip=True)[0]
    assert torch.allclose(gray["hq"][0], gray["hq"][1]) and torch.allclose(gray["lq"][0], gray["lq"][2])
    flips = {"hflip" in json.loads(make(hflip=True)[i]["degradation"]) for i in range(6)}
    assert flips == {True, False}


# ---------------------------------------------------------------- training


def _fixed_loss(task, model, batch, seeds=(7,)) -> float:
    """Mean loss over fixed draws (the step seeds the task's noise, the global seed the dropout)."""
    total = 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        total += task.training_loss(model, dict(batch), seed)[0].item()
    return total / len(seeds)


def test_stage1_lowers_its_loss_on_a_fixed_batch(files, tmp_path):
    task = CodeDiffuserTask(_stage1(files, lpips_weight=0.1, allow_random_lpips=True))
    task.setup(torch.device("cpu"), _train_cfg(tmp_path))
    torch.manual_seed(0)
    model = task.build_model()
    ds = task.train_set()
    batch = task.collate([ds[0], ds[1]], torch.device("cpu"))
    # A higher lr than the official 1.6e-3 so that a few steps show a clear trend.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.99**0.8))
    before = _fixed_loss(task, model, batch, seeds=range(4))
    for step in range(15):
        loss, logs = task.training_loss(model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {"latent_l1", "lpips", "id"} <= set(logs)
    after = _fixed_loss(task, model, batch, seeds=range(4))
    assert after < 0.9 * before


def test_stage2_generator_and_discriminator_lower_their_losses(files, tmp_path):
    task = RestorationTask(_stage2(files))
    task.setup(torch.device("cpu"), _train_cfg(tmp_path))
    torch.manual_seed(0)
    model, d = task.build_model(), task.build_aux()
    ds = task.train_set()
    batch = task.collate([ds[0], ds[1]], torch.device("cpu"))
    g_opt = torch.optim.Adam(model.parameters(), lr=1.6e-3, betas=(0.0, 0.99**0.8))
    before = _fixed_loss(task, model, batch)
    for step in range(6):  # generator against a fixed discriminator
        loss, _ = task.training_loss(model, batch, step)
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
    after = _fixed_loss(task, model, batch)
    assert after < 0.8 * before
    d_opt = torch.optim.Adam(d.parameters(), **task.aux_optimizer_settings(_train_cfg(tmp_path)))
    batch["fake"] = model(batch["lq"], batch["bank"], batch["prompt"]).detach()
    d_losses = []
    for step in range(1, 6, 2):  # odd steps: no R1, the plain logistic loss
        loss, logs = task.aux_loss(model, batch, step)
        d_losses.append(logs["d"])
        d_opt.zero_grad()
        loss.backward()
        d_opt.step()
    assert d_losses[-1] < d_losses[0]


class _Stopping:
    """Mixin: interrupt (like a ComfyUI cancel) inside the generator loss at ``stop_at``."""

    stop_at: int | None = None

    def training_loss(self, model, batch, step):
        if step == self.stop_at:
            progress.request_interrupt()
            progress.check_interrupted()
        return super().training_loss(model, batch, step)


class _StoppingStage1(_Stopping, CodeDiffuserTask):
    pass


class _StoppingStage2(_Stopping, RestorationTask):
    pass


def _rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(files, tmp_path, stage):
    def task(stop_at=None):
        cls, cfg = (_StoppingStage1, _stage1(files)) if stage == 1 else (_StoppingStage2, _stage2(files))
        t = cls(cfg)
        t.stop_at = stop_at
        return t

    train(task(), _train_cfg(tmp_path / "full"))
    with pytest.raises(progress.InterruptedByUser):
        train(task(stop_at=2), _train_cfg(tmp_path / "split"))
    train(task(), _train_cfg(tmp_path / "split"))
    full = read_checkpoint(tmp_path / "full" / "train_state.safetensors").content
    split = read_checkpoint(tmp_path / "split" / "train_state.safetensors").content
    assert set(full) == set(split)
    assert all(torch.equal(full[k], split[k]) for k in full if not k.startswith("rng.")), "state differs"
    if stage == 2:
        assert any(k.startswith("aux.") for k in full) and any(k.startswith("aux_optim.") for k in full)
        assert "r1" in _rows(tmp_path / "full")[0] and _rows(tmp_path / "full")[1]["r1"] == ""
    assert _rows(tmp_path / "full") == _rows(tmp_path / "split")


@pytest.mark.slow
def test_validation_grids_metrics_and_exports_load_in_the_pipeline_loaders(files, tmp_path):
    root = Path(files["root"])
    val = {"val_dirs": files["train_dirs"], "samples": 2}
    s1 = train(CodeDiffuserTask(_stage1(files, **val)), _train_cfg(tmp_path / "s1", steps=1, ema_decay=None))
    assert {"psnr", "ssim", "id_cos", "code_l1", "code_l1_lq"} <= set(s1["validation"])
    assert (tmp_path / "s1" / "samples" / "step_000001.png").is_file()
    diffuser = load_code_diffuser(tmp_path / "s1" / "latest.safetensors")
    state = read_checkpoint(tmp_path / "s1" / "train_state.safetensors").content
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in diffuser.state_dict().items())
    # Stage 2 starts from an official-format restoration_net.pt ('g' and 'd' entries + pickled args).
    torch.manual_seed(9)
    g0, d0 = (
        RestorationNet(RestorationConfig(size=32, **TINY_NET)),
        VSPBFRDiscriminator(DiscriminatorConfig(size=32, channel_divisor=16)),
    )
    official = root / "restoration_net.pt"
    torch.save(
        {
            "g": g0.state_dict(),
            "g_ema": g0.state_dict(),
            "d": d0.state_dict(),
            "args": argparse.Namespace(size=32),
        },
        official,
    )
    task = RestorationTask(_stage2(files, init_from=str(official), **val))
    task.setup(torch.device("cpu"), _train_cfg(tmp_path))
    assert all(torch.equal(v, g0.state_dict()[k]) for k, v in task.build_model().state_dict().items())
    assert all(torch.equal(v, d0.state_dict()[k]) for k, v in task.build_aux().state_dict().items())
    s2 = train(task, _train_cfg(tmp_path / "s2", steps=1))
    assert {"psnr", "ssim", "id_cos", "psnr_lq"} <= set(s2["validation"])
    assert (tmp_path / "s2" / "samples" / "step_000001.png").is_file()
    net = load_restoration_net(tmp_path / "s2" / "latest.safetensors")
    state = read_checkpoint(tmp_path / "s2" / "train_state.safetensors").content
    assert all(torch.equal(v, state[f"ema.{k}"]) for k, v in net.state_dict().items()), (
        "export is not the EMA"
    )
