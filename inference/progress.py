"""Progress reporting and interruption for long loops, independent of ComfyUI.

Library code calls :func:`progress_bar` and :func:`check_interrupted`; what they do depends on
the active backend. Headless the default backend draws a tqdm bar on stderr. The ComfyUI node
layer installs a backend that drives ``comfy.utils.ProgressBar`` (websocket ``progress``
messages, previews) and raises ComfyUI's own interruption exception after ``POST /interrupt``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)


class InterruptedByUser(RuntimeError):
    """Raised inside a long loop after :func:`request_interrupt` was called (headless runs)."""


class ProgressHandle(Protocol):
    """One running bar: advance it, optionally with a preview image (PIL)."""

    def update(self, n: int = 1, preview: Any | None = None) -> None: ...

    def close(self) -> None: ...


class ProgressBackend(Protocol):
    """Creates progress handles and knows how to detect an interruption request."""

    def start(self, total: int, desc: str) -> ProgressHandle: ...

    def check_interrupted(self) -> None: ...


class _TqdmHandle:
    def __init__(self, total: int, desc: str):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is a dependency, but a bare environment must still run
            self._bar = None
            log.info("%s: 0/%d", desc, total)
        else:
            # delay: short loops (one face, one image) stay silent; only work over a second shows a bar.
            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, delay=1.0)
        self._desc, self._total, self._done = desc, total, 0

    def update(self, n: int = 1, preview: Any | None = None) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            log.info("%s: %d/%d", self._desc, self._done, self._total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class HeadlessBackend:
    """tqdm bars; interruption through :func:`request_interrupt` (Ctrl-C raises on its own)."""

    def __init__(self) -> None:
        self.interrupt_requested = threading.Event()

    def start(self, total: int, desc: str) -> ProgressHandle:
        return _TqdmHandle(total, desc)

    def check_interrupted(self) -> None:
        if self.interrupt_requested.is_set():
            self.interrupt_requested.clear()
            raise InterruptedByUser("interrupted on request")


_default_backend = HeadlessBackend()
_backend: ProgressBackend = _default_backend


def set_backend(backend: ProgressBackend | None) -> None:
    """Install the process-wide progress backend (None restores the headless default)."""
    global _backend
    _backend = backend if backend is not None else _default_backend


def get_backend() -> ProgressBackend:
    """Return the active progress backend."""
    return _backend


def check_interrupted() -> None:
    """Raise if the user asked to stop; call this once per iteration of every long loop."""
    _backend.check_interrupted()


def request_interrupt() -> None:
    """Ask headless loops to stop at their next :func:`check_interrupted` (e.g. from SIGTERM)."""
    _default_backend.interrupt_requested.set()


class _CheckedHandle:
    """Wraps a handle so that every update also checks for interruption."""

    def __init__(self, handle: ProgressHandle):
        self._handle = handle

    def update(self, n: int = 1, preview: Any | None = None) -> None:
        check_interrupted()
        self._handle.update(n, preview)


@contextlib.contextmanager
def progress_bar(total: int, desc: str = "PriorFace") -> Iterator[_CheckedHandle]:
    """Context manager yielding a bar whose ``update`` also checks for interruption."""
    if total < 0:
        raise ValueError(f"progress total must be >= 0, got {total}")
    handle = _backend.start(total, desc)
    try:
        yield _CheckedHandle(handle)
    finally:
        handle.close()
