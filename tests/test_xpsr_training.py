"""XPSR trainer on tiny SD parts: trained set, loss terms, prompts, exact resume, export round trip."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_sd  # noqa: E402

from priorface.inference import progress  # noqa: E402
from priorface.inference.images import save_image_file  # noqa: E402
from priorface.models.checkpoint import read_checkpoint  # noqa: E402
from priorface.models.xpsr_checkpoints import load_xpsr_checkpoint, load_xpsr_controlnet, load_xpsr_unet  # noqa: E402
from priorface.models.xpsr_dfc import dfc_loss  # noqa: E402
from priorface.models.xpsr_unet import freeze_for_xpsr_training  # noqa: E402
from priorface.training.loop import TrainConfig, make_optimizer, train  # noqa: E402
from priorface.training.xpsr_task import XPSRTask, XPSRTaskConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # 8x8 latent: the tiny UNet's three downsamples reach 1x1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny SD parts factory, 4 training faces with per-face text files, 2 validation faces."""
    root = tmp_path_factory.mktemp("xpsr")
    tokenizer = tiny_sd.tiny_tokenizer(root / "tokenizer")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for folder, n in (("train", 4), ("val", 2)):
        for i in range(n):
            img = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), xx * yy], 0) * 0.4 + 0.5
            img = img + 0.05 * rng.standard_normal(img.shape)
            save_image_file(torch.from_numpy(img).float().clamp(0, 1), root / folder / f"face{i}.png")
    for kind in ("high", "low"):
        for i in range(4):
            (root / kind).mkdir(exist_ok=True)
            (root / kind / f"face{i}.txt").write_text(f"{kind} text of face {i}\n")

    def parts():
        return SimpleNamespace(
            family="sd15",
            unet=tiny_sd.tiny_unet("sd15", seed=0),
            vae=tiny_sd.tiny_vae(seed=10),
            text_encoders=tiny_sd.tiny_text_encoders("sd15", seed=20),
            tokenizers=[tokenizer],
            scheduler_config=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            source="tiny",
        )

    return SimpleNamespace(root=root, parts=parts)


def _task_cfg(tiny, **kw) -> XPSRTaskConfig:
    base = dict(
        base_model="<tiny>",
        train_dirs=[str(tiny.root / "train")],
        size=SIZE,
        degradation="bicubic_x4",
        high_prompts=str(tiny.root / "high"),
        low_prompts=str(tiny.root / "low"),
        val_steps=2,
        val_guidance=1.0,
    )
    base.update(kw)
    return XPSRTaskConfig(**base)


def _ready_task(tiny, from_files=False, **kw):
    torch.manual_seed(0)
    task = XPSRTask(_task_cfg(tiny, **kw), parts=None if from_files else tiny.parts)
    task.setup(torch.device("cpu"), TrainConfig(out_dir="unused"))
    model = task.build_model()
    return task, model


@pytest.fixture(scope="module")
def built(tiny):
    """One set-up task and model (building modules is the slow part); tests take private copies."""
    return _ready_task(tiny)


@pytest.fixture
def ready(built):
    """A private (task, model) pair; copied together so the UNet keeps sharing the model's modules."""
    return copy.deepcopy(built)


def _randomise_zero_convs(model, seed=3):
    # Zero convs stop every gradient into the ControlNet body at init; small weights open the graph.
    g = torch.Generator().manual_seed(seed)
    cn = model.controlnet
    for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
        for p in m.parameters():
            p.data = 0.05 * torch.randn(p.shape, generator=g)


def _batch(task, indices=(0, 1)):
    data = task.train_set()
    return task.collate([data[i] for i in indices], torch.device("cpu"))


def _loss(task, model, batch, seed=5):
    torch.manual_seed(seed)  # same latent sample, noise and timesteps for every call
    return task.training_loss(model, batch, 0)


def test_gradients_reach_exactly_the_trainable_parameters(ready):
    task, model = ready
    _randomise_zero_convs(model)
    loss, _ = _loss(task, model, _batch(task))
    loss.backward()
    official = {id(p) for p in freeze_for_xpsr_training(task.unet, model.controlnet)}
    assert {id(p) for p in model.parameters()} == official
    assert set(model.state_dict()) and all(
        k.startswith(("controlnet.", "pixel_attentions.")) for k in model.state_dict()
    ), "the trained model must not carry the frozen UNet"
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], f"trainable parameters without gradient: {no_grad[:5]}"
    frozen = [
        n
        for net in (task.unet, task.vae, task.text_encoder)
        for n, p in net.named_parameters()
        if id(p) not in official and (p.requires_grad or p.grad is not None)
    ]
    assert frozen == [], f"frozen parameters that train: {frozen[:5]}"
    # The UNet's pixel attentions are the model's modules (training updates what the UNet runs).
    assert task.unet.up_blocks[2].pixel_attentions is model.pixel_attentions[2]


def test_a_few_steps_on_one_batch_lower_the_loss(ready):
    task, model = ready
    batch = _batch(task)
    optimizer = make_optimizer(
        TrainConfig(out_dir="unused", lr=3e-3, optimizer="adamw"), list(model.parameters())
    )
    losses = []
    for _ in range(6):
        loss, _ = _loss(task, model, batch)  # one fixed batch: same draws every step
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses.append(_loss(task, model, batch)[0].item())
    # Measured: each step lowers it by 3-10 %; 6 steps reach 0.68 of the start.
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    assert losses[-1] < 0.85 * losses[0], losses


def test_dfc_weight_and_mode_are_respected(ready, monkeypatch):
    import priorface.training.xpsr_task as xpsr_task

    task, model = ready
    batch = _batch(task)
    terms = []

    def spy(*args, **kwargs):
        out = dfc_loss(*args, **kwargs)
        terms.append((len(out.pixel_terms), len(out.latent_terms), out.weight))
        return out

    monkeypatch.setattr(xpsr_task, "dfc_loss", spy)
    official = _loss(task, model, batch)
    task.cfg.dfc_mode = "paper"
    paper = _loss(task, model, batch)
    task.cfg.dfc_weight = 0.0
    none = _loss(task, model, batch)
    task.cfg.dfc_mode, task.cfg.dfc_weight = "official", 0.2
    heavy = _loss(task, model, batch)
    assert terms == [(3, 13, 0.05), (3, 3, 0.05), (3, 3, 0.0), (3, 13, 0.2)]
    for (loss, lg), w in ((official, 0.05), (paper, 0.05), (heavy, 0.2)):
        assert loss.item() == pytest.approx(lg["mse"] + w * (lg["dfc_pixel"] + lg["dfc_latent"]), rel=1e-5)
    # Same draws in every call: the MSE term is unchanged, only the DFC part differs.
    assert official[1]["mse"] == pytest.approx(heavy[1]["mse"], rel=1e-6)
    assert heavy[1]["dfc"] == pytest.approx(4 * official[1]["dfc"], rel=1e-5)
    assert none[0].item() == pytest.approx(none[1]["mse"], rel=1e-6) and none[1]["dfc"] == 0.0


def _capture_controlnet_text(task, model, batch):
    seen = {}

    def hook(_module, args, kwargs):
        seen["high"], seen["low"] = args[2].clone(), kwargs["lowlevel_encoder_hidden_states"].clone()

    handle = model.controlnet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _loss(task, model, batch)
    finally:
        handle.remove()
    return seen


def test_prompts_reach_their_branches_and_the_official_empty_high_prompt_option(ready):
    task, model = ready
    batch = _batch(task, (0, 1))
    assert batch["prompt_high"] == ["high text of face 0", "high text of face 1"]
    seen = _capture_controlnet_text(task, model, batch)
    torch.testing.assert_close(seen["high"], task.encode(batch["prompt_high"]))
    torch.testing.assert_close(seen["low"], task.encode(batch["prompt_low"]))

    task.cfg.empty_high_prompt_like_official_release = True
    emptied = _batch(task, (0, 1))
    assert emptied["prompt_high"] == ["", ""] and emptied["prompt_low"] == batch["prompt_low"]
    seen = _capture_controlnet_text(task, model, emptied)
    torch.testing.assert_close(seen["high"], task.encode(["", ""]))
    torch.testing.assert_close(seen["low"], task.encode(batch["prompt_low"]))
    assert not torch.allclose(seen["high"], task.encode(batch["prompt_high"]))


def test_a_base_model_folder_trains_like_the_same_parts_given_directly(ready, tiny, tmp_path):
    # The real path: load_sd_parts + encode_prompts (other modules; skipped while they are absent).
    pytest.importorskip("priorface.inference.sd_checkpoints")
    pytest.importorskip("priorface.inference.sd_prompts")
    folder = tiny_sd.save_tiny_diffusers_folder(tmp_path / "sd15", "sd15")
    loaded, model = _ready_task(tiny, from_files=True, base_model=str(folder))
    task, reference = ready
    model.load_state_dict(reference.state_dict())  # random inits drew from differently seeded streams
    batch = _batch(task)
    assert _loss(loaded, model, batch)[1] == pytest.approx(_loss(task, reference, batch)[1], rel=1e-5)


def test_missing_prompt_files_are_refused_by_name(tiny, tmp_path):
    (tmp_path / "high").mkdir()
    (tmp_path / "high" / "face0.txt").write_text("only one")
    task = XPSRTask(_task_cfg(tiny, high_prompts=str(tmp_path / "high")), parts=tiny.parts)
    with pytest.raises(FileNotFoundError, match="face1"):
        task.train_set()
    with pytest.raises(ValueError, match="dfc_mode"):
        XPSRTask(_task_cfg(tiny, dfc_mode="both"))


class _StopAt(XPSRTask):
    """Simulates Ctrl-C / ComfyUI cancel at the start of one step."""

    stop_at: int | None = None

    def training_loss(self, model, batch, step):
        if step == self.stop_at:
            progress.request_interrupt()
            progress.check_interrupted()
        return super().training_loss(model, batch, step)


def _train_cfg(out, **kw):
    base = dict(
        out_dir=str(out), steps=4, batch_size=2, lr=1e-3, optimizer="adamw", weight_decay=1e-2,
        grad_accum=1, grad_clip=1.0, ema_decay=0.9, log_every=1, val_every=100, ckpt_every=100, seed=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _rows(out: Path):
    with open(out / "log.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny, tmp_path):
    cfg = _task_cfg(tiny, val_dirs=[str(tiny.root / "val")], val_items=2)
    full = train(XPSRTask(cfg, parts=tiny.parts), _train_cfg(tmp_path / "full"))
    assert full["step"] == 4 and "psnr" in full["validation"]
    stopper = _StopAt(copy.deepcopy(cfg), parts=tiny.parts)
    stopper.stop_at = 2
    with pytest.raises(progress.InterruptedByUser):
        train(stopper, _train_cfg(tmp_path / "split"))
    assert (
        '"step": 2'
        in read_checkpoint(tmp_path / "split" / "train_state.safetensors").metadata["priorface.train"]
    )
    train(XPSRTask(copy.deepcopy(cfg), parts=tiny.parts), _train_cfg(tmp_path / "split"))

    a = read_checkpoint(tmp_path / "full" / "train_state.safetensors").content
    b = read_checkpoint(tmp_path / "split" / "train_state.safetensors").content
    weights = [k for k in a if k.startswith(("model.", "ema."))]
    assert weights and all(k.split(".")[1] in ("controlnet", "pixel_attentions") for k in weights)
    assert all(torch.equal(a[k], b[k]) for k in weights), "resumed weights differ from an uninterrupted run"
    assert _rows(tmp_path / "full") == _rows(tmp_path / "split")  # every logged value but wall time
    assert (tmp_path / "full" / "samples" / "step_000004.png").is_file()

    # The export (EMA weights) loads back through the official-folder loader with no key left over.
    latest = tmp_path / "full" / "latest"
    _, unet_report = load_xpsr_unet(latest / "unet")
    _, cn_report = load_xpsr_controlnet(latest / "controlnet")
    assert unet_report.ok and cn_report.ok
    unet, controlnet = load_xpsr_checkpoint(latest)
    for k, v in controlnet.state_dict().items():
        assert torch.equal(v, a[f"ema.controlnet.{k}"]), k
    pixel = {k: v for k, v in unet.state_dict().items() if ".pixel_attentions." in k}
    for k, v in pixel.items():
        block, rest = k.split(".pixel_attentions.")
        assert torch.equal(v, a[f"ema.pixel_attentions.{block.split('.')[-1]}.{rest}"]), k
    body = {k: v for k, v in unet.state_dict().items() if ".pixel_attentions." not in k}
    sd_body = tiny.parts().unet.state_dict()
    assert set(body) == set(sd_body) and all(torch.equal(body[k], sd_body[k]) for k in body)
    assert json.loads((latest / "priorface_xpsr.json").read_text())["step"] == 4
    assert not list(latest.parent.glob(".latest*")), "temporary export folders left behind"


def test_gradient_checkpointing_gives_the_same_gradients(built):
    grads = []
    for flag in (False, True):
        task, model = copy.deepcopy(built)
        if flag:
            task.unet.enable_gradient_checkpointing()
            model.controlnet.enable_gradient_checkpointing()
        _randomise_zero_convs(model)
        loss, _ = _loss(task, model, _batch(task))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_job_configs_build_the_task_and_loop_settings():
    for path in sorted((REPO / "configs" / "xpsr").glob("*.json")):
        job = json.loads(path.read_text())
        assert job["task"] == "xpsr", path
        cfg = XPSRTaskConfig(**job["task_config"])
        XPSRTask(cfg)  # validates the settings without loading anything
        TrainConfig(**job["train"])
