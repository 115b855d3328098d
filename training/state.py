"""Training state as safetensors: model, EMA, optimizer, RNG streams and counters, written atomically.

Everything a run needs to continue bit-for-bit is stored without pickle: optimizer tensors are
flattened to ``optim.<param index>.<name>`` entries, its hyper-parameters and the counters go to
JSON metadata, and the torch/numpy/python RNG states become tensors or JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import read_checkpoint, save_safetensors

STATE_ARCH = "priorface-train-state"


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, prefix: str = "optim"
) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim"
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_train_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: torch.nn.Module | None,
    counters: dict[str, Any],
    config: dict[str, Any],
    aux: torch.nn.Module | None = None,
    aux_optimizer: torch.optim.Optimizer | None = None,
    scalers: dict[str, dict] | None = None,
) -> None:
    """Write everything needed to resume exactly (atomic: a crash keeps the previous file).

    ``aux`` is a task's second trained network (e.g. discriminators) with its own optimizer;
    ``scalers`` are mixed-precision loss-scaler states (plain numbers).
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    aux_meta = None
    if aux is not None and aux_optimizer is not None:
        tensors.update({f"aux.{k}": v for k, v in aux.state_dict().items()})
        aux_tensors, aux_meta = _optimizer_tensors(aux_optimizer, "aux_optim")
        tensors.update(aux_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout and any CUDA-side draws resume exactly on GPU too
        tensors["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    meta = {
        "counters": counters,
        "optimizer": optim_meta,
        "aux_optimizer": aux_meta,
        "scalers": scalers or {},
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    save_safetensors(tensors, path, STATE_ARCH, config, extra_metadata={"priorface.train": json.dumps(meta)})


def load_train_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: torch.nn.Module | None,
    aux: torch.nn.Module | None = None,
    aux_optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Restore model, EMA, optimizer, aux network and RNG streams; return counters (+ ``scalers``)."""
    from ..models.checkpoint import load_weights

    ckpt = read_checkpoint(path)
    if ckpt.architecture != STATE_ARCH:
        raise ValueError(f"{path} is not a PriorFace training state (architecture {ckpt.architecture!r})")
    tensors = ckpt.content
    meta = json.loads(ckpt.metadata["priorface.train"])
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, source=str(path))
    if ema is not None:
        load_weights(
            ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, source=f"{path} (EMA)"
        )
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    if aux is not None and aux_optimizer is not None:
        if not meta.get("aux_optimizer"):
            raise ValueError(
                f"{path} holds no auxiliary network (discriminator) state; start a new run folder"
            )
        load_weights(
            aux, {k[4:]: v for k, v in tensors.items() if k.startswith("aux.")}, source=f"{path} (aux)"
        )
        _restore_optimizer(aux_optimizer, tensors, meta["aux_optimizer"], "aux_optim")
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        states = list(tensors["rng.cuda"].unbind(0))
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, pos, has_gauss, gauss = meta["rng_numpy"]
    np.random.set_state((version, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, g = meta["rng_python"]
    random.setstate((v, tuple(internal), g))
    return {**meta["counters"], "scalers": meta.get("scalers", {})}
