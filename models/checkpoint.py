"""Reading and writing weights safely: safetensors first, legacy pickles only with weights_only.

Everything PriorFace writes is safetensors with the architecture name and its config (JSON) in
the file's metadata, so a file rebuilds its own model. Third-party ``.pt/.pth/.ckpt/.bin`` files
are read with ``torch.load(weights_only=True)``; a caller may allow-list the few extra classes a
known checkpoint format needs (``argparse.Namespace`` for example), nothing else. Key mismatches
are reported by name; there is no silent ``strict=False``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

ARCH_KEY = "priorface.architecture"
CONFIG_KEY = "priorface.config"
FORMAT_KEY = "priorface.format_version"
FORMAT_VERSION = "1"

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pt2")


class CheckpointError(Exception):
    """Base class: a weights file could not be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle wanted to build Python objects outside the allow-list (possible code execution)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged, or not a weights file at all."""


class KeyMismatchError(CheckpointError):
    """State-dict keys or shapes do not match the model; lists them by name."""

    def __init__(self, report: KeyReport, source: str):
        self.report = report
        super().__init__(f"weights from {source} do not match the model:\n{report.describe()}")


@dataclass
class Checkpoint:
    """Tensors (or the raw unpickled object) of a file plus its string metadata."""

    path: Path
    content: Any
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        """Architecture name recorded by PriorFace, if any."""
        return self.metadata.get(ARCH_KEY)

    @property
    def config(self) -> dict[str, Any]:
        """Model config recorded by PriorFace (empty for third-party files)."""
        raw = self.metadata.get(CONFIG_KEY)
        return json.loads(raw) if raw else {}


@dataclass
class KeyReport:
    """Result of matching a state dict against a model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or of the wrong shape."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def describe(self, limit: int = 20) -> str:
        """Human-readable listing, at most ``limit`` names per category."""
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (
                    f", ... ({len(items) - limit} more)" if len(items) > limit else ""
                )
                lines.append(f"  {len(items)} {title} key(s): {shown}")
        for name, got, want in self.shape_mismatch[:limit]:
            lines.append(f"  shape mismatch {name}: file has {list(got)}, model expects {list(want)}")
        return "\n".join(lines) or "  all keys match"


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    architecture: str,
    config: Mapping[str, Any],
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors atomically as safetensors with architecture and JSON config in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {
        ARCH_KEY: architecture,
        CONFIG_KEY: json.dumps(dict(config), sort_keys=True),
        FORMAT_KEY: FORMAT_VERSION,
    }
    metadata.update(extra_metadata or {})
    # safetensors refuses shared or non-contiguous storage; clone so the caller's tensors stay untouched.
    flat = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))
    return path


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a normal write would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike, allowed_globals: Iterable[Any] = ()) -> Checkpoint:
    """Load a weights file on CPU: safetensors directly, pickles with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        return _read_safetensors(path)
    return _read_pickle(path, tuple(allowed_globals))


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors starts with an 8-byte little-endian header length followed by '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{path} ({path.stat().st_size} bytes) is not a readable safetensors file: {e}. "
            "It may be truncated (interrupted download or copy); replace it."
        ) from None
    return Checkpoint(path, tensors, metadata)


def _read_pickle(path: Path, allowed: tuple[Any, ...]) -> Checkpoint:
    try:
        with torch.serialization.safe_globals(list(allowed)):
            content = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it asks for {found.group(1)}" if found else str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains Python objects other than tensors ({reason}). "
            "PriorFace only unpickles plain weights (torch.load with weights_only=True), because a pickle "
            "can run arbitrary code when loaded. Use a safetensors version of this file, or a format "
            "PriorFace knows (see README, 'Model files')."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CorruptCheckpointError(
            f"{path} ({path.stat().st_size} bytes) could not be read as a PyTorch checkpoint: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. It may be truncated or not a weights file."
        ) from None
    return Checkpoint(path, content, {})


def match_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    ignore_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
) -> KeyReport:
    """Compare a state dict with a module; ``ignore_*`` are fnmatch patterns that are allowed."""
    own = module.state_dict()
    ign_m, ign_u = tuple(ignore_missing), tuple(ignore_unexpected)
    report = KeyReport()
    report.missing = sorted(k for k in own if k not in state_dict and not _matches(k, ign_m))
    report.unexpected = sorted(k for k in state_dict if k not in own and not _matches(k, ign_u))
    for k, v in state_dict.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            report.shape_mismatch.append((k, tuple(v.shape), tuple(own[k].shape)))
    return report


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def load_weights(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    ignore_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
) -> KeyReport:
    """Load into ``module`` or raise KeyMismatchError naming each key; only listed patterns may differ."""
    report = match_state_dict(module, state_dict, ignore_missing, ignore_unexpected)
    if not report.ok:
        raise KeyMismatchError(report, source)
    own = module.state_dict()
    usable = {k: v for k, v in state_dict.items() if k in own}
    # strict=False is safe here: every difference was checked above against the explicit patterns.
    module.load_state_dict(usable, strict=False)
    return report
