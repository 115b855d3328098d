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
    optimizer: str = "adam"  # "adam" or "adamw" (decoupled weight decay)
    precision: str = "fp32"  # "fp32", "fp16" or "bf16"; half precision only autocasts on CUDA
    extra: dict = field(default_factory=dict)


class TrainTask:
    """What one trainable thing needs; subclasses implement the methods that raise.

    Frozen networks (a VAE, a text encoder, a frozen UNet) belong on the task, created in
    :meth:`setup`, not in the model: the training state then holds only what trains. A second
    trained network (GAN discriminators) comes from :meth:`build_aux`; the loop gives it its own
    optimizer, steps it after every generator step with :meth:`aux_loss`, and checkpoints it.
    """

    name = "task"

    def setup(self, device: torch.device, cfg: TrainConfig) -> None:
        """Called once before :meth:`build_model`: load frozen networks onto ``device``."""

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates (default: every parameter that requires grad)."""
        return [p for p in model.parameters() if p.requires_grad]

    def build_aux(self) -> torch.nn.Module | None:
        """An auxiliary trained network (e.g. discriminators) the task keeps a reference to, or None."""
        return None

    def aux_loss(
        self, model: torch.nn.Module, batch: dict, step: int
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Loss of the auxiliary network on a batch already used for the generator step (None: skip)."""
        return None, {}

    def aux_optimizer_settings(self, cfg: TrainConfig) -> dict[str, Any]:
        """Adam settings of the auxiliary optimizer (lr, betas, eps)."""
        return {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}

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


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam or AdamW as the config says."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.optimizer not in kinds:
        raise ValueError(f"optimizer must be one of {sorted(kinds)}, got {cfg.optimizer!r}")
    if not params:
        raise ValueError("the task has no trainable parameters (all frozen?)")
    return kinds[cfg.optimizer](
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this run, or None for full fp32 (always on CPU)."""
    table = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if cfg.precision not in table:
        raise ValueError(f"precision must be one of {sorted(table)}, got {cfg.precision!r}")
    if table[cfg.precision] is not None and device.type != "cuda":
        log.info("precision %s needs CUDA; training in fp32 on %s", cfg.precision, device)
        return None
    return table[cfg.precision]


class _Precision:
    """Autocast + loss scaling for one optimizer (scaling only for fp16)."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device, state: dict | None):
        self.dtype, self.device = dtype, device
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def autocast(self):
        """Context that runs the forward pass in the run's precision."""
        import contextlib

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward with loss scaling when needed."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list, clip: float | None) -> None:
        """Unscale, clip, step and update the scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state(self) -> dict:
        """Scaler state as plain numbers (for the training state file)."""
        return dict(self.scaler.state_dict()) if self.scaler is not None else {}


def _check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} became {loss.item()} at step {step}; lower the lr")


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
    task.setup(device, cfg)
    model = task.build_model().to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay else None
    params = task.trainable_parameters(model)
    optimizer = make_optimizer(cfg, params)
    aux = task.build_aux()
    aux_params: list = []
    aux_optimizer = None
    if aux is not None:
        aux.to(device)
        aux_params = [p for p in aux.parameters() if p.requires_grad]
        aux_optimizer = torch.optim.Adam(aux_params, **task.aux_optimizer_settings(cfg))
    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "seconds": 0.0}
    scaler_states: dict = {}
    state_path = out / STATE_FILE
    resumed = resume and state_path.is_file()
    if resumed:
        counters = load_train_state(state_path, model, optimizer, ema, aux, aux_optimizer)
        scaler_states = counters.pop("scalers", {})
        log.info("resumed %s from step %d", out, counters["step"])
    amp = autocast_dtype(cfg, device)
    precision = _Precision(amp, device, scaler_states.get("model"))
    aux_precision = _Precision(amp, device, scaler_states.get("aux"))
    csv_log = CsvLog(out / LOG_FILE, counters["step"] if resumed else None)
    dataset = task.train_set()
    per_epoch = len(dataset) // cfg.batch_size
    if per_epoch < max(1, cfg.grad_accum):
        raise ValueError(
            f"one optimizer step needs {cfg.grad_accum} batch(es) of {cfg.batch_size}, but the training set "
            f"has {len(dataset)} items: lower batch_size or grad_accum, or add images"
        )
    run_config = {"train": asdict(cfg), "task": task.config(), "task_name": task.name}

    def checkpoint() -> None:
        scalers = {"model": precision.state(), "aux": aux_precision.state()}
        save_train_state(state_path, model, optimizer, ema, counters, run_config, aux, aux_optimizer, scalers)
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
                    if aux is not None:
                        aux.train()
                    logs: dict[str, float] = {}
                    batches = []
                    for _ in range(cfg.grad_accum):
                        b = counters["batch_in_epoch"]
                        items = [
                            dataset[int(i)] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                        ]
                        batches.append(task.collate(items, device))
                        with precision.autocast():
                            loss, logs = task.training_loss(model, batches[-1], step)
                        _check_finite(loss, "loss", step)
                        precision.backward(loss / cfg.grad_accum)
                        counters["batch_in_epoch"] = b + 1
                    precision.step(optimizer, params, cfg.grad_clip)
                    optimizer.zero_grad(set_to_none=True)
                    if aux_optimizer is not None:
                        logs.update(
                            _aux_step(task, model, batches, step, aux_optimizer, aux_params, aux_precision)
                        )
                        optimizer.zero_grad(set_to_none=True)  # drop what the aux loss left on the model
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


def _aux_step(task, model, batches, step, aux_optimizer, aux_params, precision) -> dict[str, float]:
    """One auxiliary (discriminator) update on the generator step's batches."""
    aux_optimizer.zero_grad(set_to_none=True)  # the generator loss put gradients here too
    logs: dict[str, float] = {}
    used = False
    for batch in batches:
        with precision.autocast():
            loss, logs = task.aux_loss(model, batch, step)
        if loss is None:
            continue
        _check_finite(loss, "auxiliary loss", step)
        precision.backward(loss / len(batches))
        used = True
    if used:
        precision.step(aux_optimizer, aux_params, None)
    aux_optimizer.zero_grad(set_to_none=True)
    return logs


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
