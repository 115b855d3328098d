"""Pure helpers for state dicts: flattening nested checkpoints, renaming key prefixes."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def flatten_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Collect every tensor in nested dicts/lists as {'a.b.0': tensor}; other values are skipped."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten_tensors(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_tensors(v, f"{prefix}{i}."))
    return out


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only keys starting with ``prefix`` and drop it (e.g. 'encoder.' of an e4e checkpoint)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
