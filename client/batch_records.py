"""Bookkeeping of a batch: the resumable results CSV, the overall progress line, per-item state."""

import csv
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .comfy_api import (
    ComfyConnectionError,
    summarize_execution_error,
)

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("input", "outputs", "status", "seconds", "error")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename, so it is never seen half-written."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ResultsTable:
    """The results CSV (input, outputs, status, seconds, error), rewritten atomically on every change."""

    def __init__(self, path: str | Path, fresh: bool = False):
        self.path = Path(path)
        self.rows: dict[str, dict[str, str]] = {}
        if self.path.is_file() and not fresh:
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not {"input", "status"} <= set(reader.fieldnames or []):
                    raise ValueError(
                        f"{self.path} is not a results CSV: expected columns {RESULT_COLUMNS}, got {reader.fieldnames}"
                    )
                self.rows = {r["input"]: r for r in reader}

    def finished(self, name: str, out_dir: Path) -> bool:
        """True when ``name`` succeeded before and every output file it listed still exists."""
        row = self.rows.get(name)
        if not row or row.get("status") != "success":
            return False
        return all((out_dir / o).is_file() for o in (row.get("outputs") or "").split(";") if o)

    def record(self, name: str, status: str, outputs: list[str], seconds: float, error: str = "") -> None:
        """Set the row of ``name`` and rewrite the file."""
        self.rows[name] = {
            "input": name,
            "outputs": ";".join(outputs),
            "status": status,
            "seconds": f"{seconds:.2f}",
            "error": " ".join(error.split()),  # one line per row
        }
        self.save()

    def save(self) -> None:
        """Rewrite the CSV atomically, rows sorted by input name."""
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for name in sorted(self.rows):
            writer.writerow(self.rows[name])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path, buf.getvalue().encode("utf-8"))


# -- progress ------------------------------------------------------------------------------------
class Progress:
    """Overall progress over items plus the current node's progress: tqdm when installed, else one stderr line."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.count, self.failed = total, 0, 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._bar = None
        self._width = 0
        self._last = 0.0
        self._detail = ""
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True)

    def node(self, name: str, text: str) -> None:
        """Show what the server is doing for item ``name``."""
        self._detail = f"{name}: {text}"
        self._show(force=False)

    def done(self, name: str, status: str) -> None:
        """Count one finished item."""
        self.count += 1
        self.failed += status != "success"
        self._detail = f"{name}: {status}"
        if self._bar is not None:
            self._bar.update(1)
        self._show(force=True)

    def _show(self, force: bool) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._detail, refresh=force)
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        line = f"{self.count}/{self.total} done, {self.failed} failed | {self._detail}"[:150]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        """End the bar (a newline for the plain line)."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()


class ServerGone(ComfyConnectionError):
    """The server stayed unreachable for longer than the reconnect timeout."""


# -- the batch -----------------------------------------------------------------------------------
@dataclass
class Item:
    """One input image and its state."""

    path: Path
    workflow: dict
    failures: int = 0
    started: float | None = None  # first submission (for the seconds column)
    clock: float = 0.0  # start of the current wait (for --timeout)
    errors: list[str] = field(default_factory=list)


def output_name(stem: str, node_id: str, index: int, server_name: str) -> str:
    """``<input stem>_<node>_<index><suffix of the server's file>`` (.png by default)."""
    suffix = Path(server_name).suffix or ".png"
    node = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(node_id))
    return f"{stem}_{node}_{index}{suffix}"


def _node_key(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def history_error(entry: dict) -> str:
    """The error message of a failed history entry."""
    for message in (entry.get("status") or {}).get("messages", []):
        if isinstance(message, (list, tuple)) and len(message) == 2:
            kind, data = message
            if kind == "execution_error":
                return summarize_execution_error(data)
            if kind == "execution_interrupted":
                return f"interrupted on the server at node {data.get('node_id')} ({data.get('node_type')})"
    return f"status {(entry.get('status') or {}).get('status_str', 'unknown')}"
