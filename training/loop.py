"""The one training loop: Adam, gradient accumulation, EMA, validation, atomic checkpoints, exact resume.

A task (see :class:`TrainTask`) says what the model, data, loss and validation are; this loop does
the rest. Data order is a permutation seeded by (seed, epoch) and each item's random degradation
is seeded by (seed, epoch, index) in the dataset, so a run resumed from its checkpoint continues
exactly as if it had never stopped: same batches, same dropout draws (RNG states are restored),
same curve. Rows logged after the last checkpoint are dropped from ``log.csv`` on resume.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.device import resolve_device
from ..inference.progress import progress_bar
from .state import load_train_state, save_train_state

log = logging.getLogger(__name__)

STATE_FILE = "train_state.safetensors"
LOG_FILE = "log.csv"


@dataclass
class TrainConfig:
    """Loop settings (the task holds model and data settings)."""

    out_dir: str  # run folder: state, log.csv, curves.png, samples/, exported weights
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 1% of lr at the last step)
    warmup_steps: int = 0
    grad_accum: int = 1  # batches per optimizer step
    grad_clip: float | None = None  # max gradient norm
    ema_decay: float | None = None  # e.g. 0.999; validation and export then use the EMA weights
    val_every: int = 200
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    max_minutes: float | None = None  # stop (with a checkpoint) after this much wall time
    device: str = "auto"
    extra: dict = field(default_factory=dict)


class TrainTask:
    """What one trainable thing needs; subclasses implement every method."""

    name = "task"

    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model (seeded by the loop before the call)."""
        raise NotImplementedError

    def train_set(self):
        """Dataset with ``__len__``, ``__getitem__`` and ``set_epoch(epoch)``."""
        raise NotImplementedError

    def collate(self, items: list[dict], device: torch.device) -> dict:
        """Stack dataset items into a batch on ``device``."""
        raise NotImplementedError

    def training_loss(
        self, model: torch.nn.Module, batch: dict, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to minimise and scalars to log."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        """Metrics on the held-out split (may write sample images into ``out_dir``)."""
        return {}

    def export(self, model: torch.nn.Module, path: Path, step: int) -> None:
        """Write user-facing weights (safetensors with config metadata)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Task settings recorded with the checkpoint."""
        return {}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled item order of one epoch (depends only on seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate at an optimizer step under the configured warm-up and schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        t = min(1.0, step / max(1, cfg.steps - 1))
        return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))
    if cfg.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    return cfg.lr


class CsvLog:
    """Append-only CSV of scalars per step; on resume rows past the checkpoint step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._write()

    def add(self, row: dict[str, Any]) -> None:
        """Record one row and rewrite the file (small: one row per log interval)."""
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys or ["step"])
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def train(task: TrainTask, cfg: TrainConfig, resume: bool = True) -> dict[str, Any]:
    """Run (or continue) training; returns a summary with the last step and validation metrics."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = task.build_model().to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay else None
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "seconds": 0.0}
    state_path = out / STATE_FILE
    resumed = resume and state_path.is_file()
    if resumed:
        counters = load_train_state(state_path, model, optimizer, ema)
        log.info("resumed %s from step %d", out, counters["step"])
    csv_log = CsvLog(out / LOG_FILE, counters["step"] if resumed else None)
    dataset = task.train_set()
    per_epoch = len(dataset) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"batch size {cfg.batch_size} is larger than the training set ({len(dataset)} items)"
        )
    run_config = {"train": asdict(cfg), "task": task.config(), "task_name": task.name}

    def checkpoint() -> None:
        save_train_state(state_path, model, optimizer, ema, counters, run_config)
        task.export(ema or model, out / "latest.safetensors", counters["step"])

    start, last = time.time(), {}
    seconds_before = counters["seconds"]
    try:
        with progress_bar(cfg.steps - counters["step"], f"Training {task.name}") as bar:
            while counters["step"] < cfg.steps:
                order = epoch_order(cfg.seed, counters["epoch"], len(dataset))
                dataset.set_epoch(counters["epoch"])
                while (
                    counters["batch_in_epoch"] + cfg.grad_accum <= per_epoch and counters["step"] < cfg.steps
                ):
                    step = counters["step"]
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(cfg, step)
                    model.train()
                    logs: dict[str, float] = {}
                    for _ in range(cfg.grad_accum):
                        b = counters["batch_in_epoch"]
                        items = [
                            dataset[int(i)] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                        ]
                        loss, logs = task.training_loss(model, task.collate(items, device), step)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"loss became {loss.item()} at step {step}; lower the lr"
                            )
                        (loss / cfg.grad_accum).backward()
                        counters["batch_in_epoch"] = b + 1
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        # Warm-up: early on the average would be dominated by the random init.
                        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
                    counters["step"] = step + 1
                    counters["seconds"] = seconds_before + time.time() - start
                    if counters["step"] % cfg.log_every == 0:
                        csv_log.add(
                            {
                                "step": counters["step"],
                                "lr": optimizer.param_groups[0]["lr"],
                                "seconds": counters["seconds"],
                                **logs,
                            }
                        )
                    if counters["step"] % cfg.val_every == 0 or counters["step"] == cfg.steps:
                        last = _validate(task, ema or model, counters, out, csv_log)
                    if counters["step"] % cfg.ckpt_every == 0:
                        checkpoint()
                    bar.update(1)
                    if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
                        log.info(
                            "time budget of %.1f min reached at step %d", cfg.max_minutes, counters["step"]
                        )
                        checkpoint()
                        return _finish(out, counters, last, stopped="time budget")
                counters["epoch"] += 1
                counters["batch_in_epoch"] = 0
    except BaseException:
        # Interrupted (Ctrl-C, ComfyUI cancel) or failed: keep the last completed step for resume.
        if counters["step"] > 0:
            checkpoint()
        raise
    checkpoint()
    return _finish(out, counters, last, stopped=None)


def _validate(task: TrainTask, model: torch.nn.Module, counters: dict, out: Path, csv_log: CsvLog) -> dict:
    model.eval()
    with torch.no_grad():
        metrics = task.validate(model, counters["step"], out)
    if metrics:
        csv_log.add({"step": counters["step"], **{f"val_{k}": v for k, v in metrics.items()}})
        log.info("step %d validation: %s", counters["step"], metrics)
    return metrics


def _finish(out: Path, counters: dict, last: dict, stopped: str | None) -> dict[str, Any]:
    from .plots import plot_log

    plot_log(out / LOG_FILE, out / "curves.png")
    return {"step": counters["step"], "seconds": counters["seconds"], "validation": last, "stopped": stopped}
