"""Generic training loop: exact resume after a stop, interruption checkpoints, EMA, curves."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from priorface.inference import progress
from priorface.models.checkpoint import read_checkpoint, save_safetensors
from priorface.training.loop import TrainConfig, TrainTask, learning_rate, train


class _Noisy(torch.utils.data.Dataset):
    """Items whose noise depends on (epoch, index) like the face datasets."""

    def __init__(self, n=24):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        clean = torch.linspace(0, 1, 64).reshape(1, 8, 8) * (i % 5) / 4
        return {"clean": clean, "noisy": clean + 0.1 * torch.randn(clean.shape, generator=g)}


class _Task(TrainTask):
    name = "toy"

    def __init__(self, stop_at=None):
        self.stop_at = stop_at

    def build_model(self):
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Dropout(0.2), torch.nn.Conv2d(4, 1, 3, padding=1)
        )

    def train_set(self):
        return _Noisy()

    def collate(self, items, device):
        return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}

    def training_loss(self, model, batch, step):
        if self.stop_at is not None and step == self.stop_at:
            progress.request_interrupt()
            progress.check_interrupted()
        loss = (model(batch["noisy"]) - batch["clean"]).abs().mean()
        return loss, {"loss": loss.item()}

    def validate(self, model, step, out_dir):
        x = _Noisy()[0]
        return {"l1": float((model(x["noisy"][None]) - x["clean"]).abs().mean())}

    def export(self, model, path, step):
        save_safetensors(model.state_dict(), path, "toy", {"step": step})


def _cfg(out, **kw):
    base = dict(
        out_dir=str(out),
        steps=14,
        batch_size=4,
        lr=1e-2,
        log_every=1,
        val_every=7,
        ckpt_every=3,
        ema_decay=0.9,
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(out: Path):
    with open(out / "log.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


def test_resume_after_kill_gives_the_same_run(tmp_path):
    full = train(_Task(), _cfg(tmp_path / "full"))
    assert full["step"] == 14 and "l1" in full["validation"]
    # A run "killed" after step 8: stop via the time budget trick (max_minutes tiny) is not exact, so
    # stop it with an interruption, then resume in a fresh call.
    with pytest.raises(progress.InterruptedByUser):
        train(_Task(stop_at=8), _cfg(tmp_path / "split"))
    state = read_checkpoint(tmp_path / "split" / "train_state.safetensors")
    assert '"step": 8' in state.metadata["priorface.train"]
    resumed = train(_Task(), _cfg(tmp_path / "split"))
    assert resumed["step"] == 14
    a = read_checkpoint(tmp_path / "full" / "latest.safetensors").content
    b = read_checkpoint(tmp_path / "split" / "latest.safetensors").content
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    assert (tmp_path / "split" / "curves.png").is_file()


def test_resume_from_an_older_checkpoint_drops_later_log_rows(tmp_path):
    train(_Task(), _cfg(tmp_path / "run", steps=6, ckpt_every=3))
    rows_before = _losses(tmp_path / "run")
    assert len(rows_before) == 6
    train(_Task(), _cfg(tmp_path / "run", steps=9, ckpt_every=3))
    assert [int(s) for s, _ in _losses(tmp_path / "run")] == list(range(1, 10))


def test_learning_rate_schedules():
    cfg = TrainConfig(out_dir="x", steps=101, lr=1.0, lr_schedule="cosine", warmup_steps=10)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 100) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate(TrainConfig(out_dir="x", lr_schedule="step"), 5)


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lower batch_size or grad_accum"):
        train(_Task(), _cfg(tmp_path, batch_size=100))
    # 24 items = 6 batches of 4: accumulating 8 of them per step would never complete a step.
    with pytest.raises(ValueError, match="needs 8 batch"):
        train(_Task(), _cfg(tmp_path / "accum", grad_accum=8))


class _GanTask(_Task):
    """A generator with a frozen input layer and a critic trained alternately (aux network)."""

    name = "toy-gan"

    def build_model(self):
        model = super().build_model()
        model[0].requires_grad_(False)  # frozen part: must never change nor enter the optimizer
        return model

    def build_aux(self):
        torch.manual_seed(5)
        self.critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
        return self.critic

    def training_loss(self, model, batch, step):
        loss, logs = super().training_loss(model, batch, step)
        adv = torch.nn.functional.softplus(-self.critic(model(batch["noisy"]))).mean()
        return loss + 0.1 * adv, {**logs, "adv": adv.item()}

    def aux_loss(self, model, batch, step):
        if step % 2:  # lazy schedule: the loop must accept "no update this step"
            return None, {}
        fake = model(batch["noisy"]).detach()
        d = torch.nn.functional.softplus(self.critic(fake)) + torch.nn.functional.softplus(
            -self.critic(batch["clean"])
        )
        return d.mean(), {"d_loss": d.mean().item()}


def test_aux_network_trains_alternately_and_resumes_exactly(tmp_path):
    cfg = dict(optimizer="adamw", weight_decay=0.01, ema_decay=None)
    train(_GanTask(), _cfg(tmp_path / "full", **cfg))
    with pytest.raises(progress.InterruptedByUser):
        train(_GanTask(stop_at=7), _cfg(tmp_path / "split", **cfg))
    train(_GanTask(), _cfg(tmp_path / "split", **cfg))
    full = read_checkpoint(tmp_path / "full" / "train_state.safetensors").content
    split = read_checkpoint(tmp_path / "split" / "train_state.safetensors").content
    assert set(full) == set(split) and any(k.startswith("aux_optim.") for k in full)
    assert all(torch.equal(full[k], split[k]) for k in full if not k.startswith("rng."))
    torch.manual_seed(5)
    critic0 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    assert not torch.equal(full["aux.1.weight"], critic0[1].weight), "the critic never trained"
    torch.manual_seed(0)  # the loop seeds with cfg.seed before building the model
    frozen = _GanTask().build_model()[0].weight
    assert torch.equal(full["model.0.weight"], frozen), "a frozen parameter changed"
    with open(tmp_path / "full" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("d_loss") for r in rows) and any(r.get("adv") for r in rows)
    optimized = {k.split(".")[1] for k in full if k.startswith("optim.")}
    assert optimized == {"0", "1"}, "only the last conv's weight and bias may be optimized"


def test_unknown_optimizer_and_precision_are_refused(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        train(_Task(), _cfg(tmp_path / "a", optimizer="sgd"))
    with pytest.raises(ValueError, match="precision"):
        train(_Task(), _cfg(tmp_path / "b", precision="fp8"))
