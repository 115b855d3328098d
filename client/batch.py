"""``priorface batch``: run an API-format workflow once per image of a folder on a running ComfyUI.

Each image is uploaded, set on the workflow's image-loading node (plus optional per-image values from a
CSV), queued, followed over the websocket, and its outputs downloaded; a results CSV records every item
and lets a rerun skip what is finished. Standard library only (websocket-client for live progress).
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from collections import deque
from pathlib import Path

from .batch_records import (
    Item,
    Progress,
    ResultsTable,
    ServerGone,
    _atomic_write,
    _node_key,
    history_error,
    output_name,
)
from .batch_workflow import (
    apply_params,
    find_image_node,
    list_images,
    load_workflow,
    params_for,
    read_params,
)
from .comfy_api import (
    ComfyClient,
    ComfyConnectionError,
    ComfyError,
    ComfyValidationError,
)

log = logging.getLogger(__name__)
_NO_HANDLER = object()


class BatchRunner:
    """Submits items with at most ``concurrency`` prompts in flight and records each result."""

    def __init__(
        self,
        client: ComfyClient,
        image_node: str,
        out_dir: Path,
        results: ResultsTable,
        *,
        retries: int = 1,
        concurrency: int = 1,
        item_timeout: float | None = None,
        reconnect_timeout: float = 120.0,
        upload_subfolder: str = "priorface_batch",
        progress: Progress | None = None,
        poll_interval: float | None = None,
    ):
        if concurrency < 1 or retries < 0:
            raise ValueError(f"need concurrency >= 1 and retries >= 0, got {concurrency} and {retries}")
        self.client = client
        self.image_node = image_node
        self.out_dir = Path(out_dir)
        self.results = results
        self.retries = retries
        self.concurrency = concurrency
        self.item_timeout = item_timeout
        self.reconnect_timeout = reconnect_timeout
        self.upload_subfolder = upload_subfolder
        self.progress = progress or Progress(0, enabled=False)
        self.poll_interval = poll_interval
        self.pending: deque[Item] = deque()
        self.in_flight: dict[str, Item] = {}  # prompt id -> item, in submission order
        self.counts = {"success": 0, "error": 0, "interrupted": 0}
        self.resubmitted = 0
        self._events = None
        self._lost_since: float | None = None
        self._stop = False

    # -- main loop ------------------------------------------------------------------------------
    def run(self, items: list[Item]) -> dict:
        """Process ``items``; counts per status, and ``aborted`` True after Ctrl-C (server told to stop)."""
        self.pending.extend(items)
        aborted = False
        previous = self._catch_ctrl_c()
        try:
            self._events = self.client.events()
            if self._events is None:
                log.info("websocket-client is not installed: polling /history (no per-node progress)")
            while (self.pending or self.in_flight) and not self._stop:
                try:
                    if self._lost_since is not None:
                        self._recover()
                    self._fill()
                    if self.in_flight:
                        self._wait_step()
                except ServerGone:
                    raise
                except ComfyConnectionError as e:
                    if self._lost_since is None:
                        log.warning(
                            "lost the server (%s); reconnecting for up to %.0f s", e, self.reconnect_timeout
                        )
                        self._lost_since = time.monotonic()
                    self._close_events()
            if self._stop:
                aborted = True
                self._abort()
        except KeyboardInterrupt:  # a second Ctrl-C, or not on the main thread
            aborted = True
            self._abort()
        finally:
            if previous is not _NO_HANDLER:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
            self._close_events()
            self.progress.close()
        return {**self.counts, "resubmitted": self.resubmitted, "aborted": aborted}

    def _catch_ctrl_c(self):
        """Turn the first Ctrl-C into a stop request handled between steps (nothing half-done).

        A second Ctrl-C raises KeyboardInterrupt at once. Returns the previous handler (_NO_HANDLER
        when not on the main thread, where signals cannot be caught).
        """
        if threading.current_thread() is not threading.main_thread():
            return _NO_HANDLER

        def request_stop(signum, frame):
            self._stop = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            log.warning("Ctrl-C: stopping after the current step (press again to quit at once)")

        return signal.signal(signal.SIGINT, request_stop)

    def _fill(self) -> None:
        """Upload and queue items until ``concurrency`` prompts are in flight."""
        while self.pending and len(self.in_flight) < self.concurrency and not self._stop:
            item = self.pending.popleft()
            try:
                self._submit(item)
            except ComfyConnectionError:
                self.pending.appendleft(item)
                raise

    def _submit(self, item: Item) -> None:
        now = time.monotonic()
        if item.started is None:
            item.started = now
        prompt = copy.deepcopy(item.workflow)
        prompt[self.image_node]["inputs"]["image"] = self.client.upload_image(
            item.path, self.upload_subfolder
        )
        try:
            prompt_id = self.client.queue_prompt(prompt)
        except ComfyValidationError as e:
            # The same graph fails validation every time: record at once, no retry.
            self._record(item, "error", [], f"validation failed: {e}")
            return
        except ComfyConnectionError:
            raise
        except ComfyError as e:
            self._failed(item, str(e))
            return
        item.clock = now
        self.in_flight[prompt_id] = item
        self.progress.node(item.path.name, "queued")
        log.debug("queued %s as %s", item.path.name, prompt_id)

    def _wait_step(self) -> None:
        """Handle websocket messages (or sleep) for one poll interval, then poll histories and timeouts."""
        interval = self.poll_interval or (1.0 if self._events is not None else 0.25)
        deadline = time.monotonic() + interval
        if self._events is not None:
            while (
                self.in_flight
                and not self._room()
                and not self._stop
                and (remaining := deadline - time.monotonic()) > 0
            ):
                message = self._events.next(remaining)
                if message is None:
                    break
                self._on_message(message)
        else:
            time.sleep(interval)
        for prompt_id in list(self.in_flight):
            self._poll(prompt_id)
        self._check_timeouts()

    def _room(self) -> bool:
        """True when another item could be queued now."""
        return bool(self.pending) and len(self.in_flight) < self.concurrency

    def _on_message(self, message: dict) -> None:
        kind, data = message.get("type"), message.get("data") or {}
        item = self.in_flight.get(data.get("prompt_id"))
        if item is None:
            return
        node = data.get("node")
        if kind == "progress":
            label = f"{self._node_label(item, node)} {data.get('value')}/{data.get('max')}"
            self.progress.node(item.path.name, label)
        elif kind == "executing" and node is not None:
            self.progress.node(item.path.name, self._node_label(item, node))
        elif kind in ("execution_success", "execution_error", "execution_interrupted", "executing"):
            # History is written just after these messages: poll it briefly.
            self._poll(data["prompt_id"], wait=3.0)

    @staticmethod
    def _node_label(item: Item, node_id) -> str:
        return f"node {node_id} {item.workflow.get(str(node_id), {}).get('class_type', '?')}"

    def _poll(self, prompt_id: str, wait: float = 0.0) -> None:
        """Finish ``prompt_id`` if the server has its history (retrying for up to ``wait`` seconds)."""
        end = time.monotonic() + wait
        while prompt_id in self.in_flight:
            entry = self.client.history(prompt_id)
            if entry is not None:
                self._finish(prompt_id, entry)
                return
            if time.monotonic() >= end or self._stop:
                return
            time.sleep(0.05)

    def _finish(self, prompt_id: str, entry: dict) -> None:
        item = self.in_flight.pop(prompt_id)
        self._restart_clock()
        if (entry.get("status") or {}).get("status_str", "success") != "success":
            self._failed(item, history_error(entry))
            return
        try:
            outputs = self._download(item, entry.get("outputs") or {})
        except ComfyConnectionError:
            self.in_flight[prompt_id] = item  # poll again after reconnecting
            raise
        except ComfyError as e:
            self._failed(item, f"download failed: {e}")
            return
        self._record(item, "success", outputs)

    def _download(self, item: Item, outputs: dict) -> list[str]:
        """Save every ``type: output`` file of the history outputs as ``<stem>_<node>_<index>``."""
        names = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for node_id in sorted(outputs, key=_node_key):
            files = [
                f
                for value in outputs[node_id].values()
                if isinstance(value, list)
                for f in value
                if isinstance(f, dict) and "filename" in f and f.get("type") == "output"
            ]
            for index, f in enumerate(files):
                data = self.client.view(f["filename"], f.get("subfolder", ""), "output")
                name = output_name(item.path.stem, node_id, index, f["filename"])
                _atomic_write(self.out_dir / name, data)
                names.append(name)
        if not names:
            log.warning("%s: the workflow produced no saved output (only previews?)", item.path.name)
        return names

    def _failed(self, item: Item, error: str) -> None:
        """Retry ``item`` if attempts are left, else record the error."""
        item.failures += 1
        item.errors.append(error)
        if item.failures <= self.retries:
            log.warning(
                "%s failed (attempt %d of %d): %s", item.path.name, item.failures, self.retries + 1, error
            )
            self.pending.appendleft(item)
        else:
            self._record(item, "error", [], error)

    def _record(self, item: Item, status: str, outputs: list[str], error: str = "") -> None:
        seconds = time.monotonic() - (item.started or time.monotonic())
        self.results.record(item.path.name, status, outputs, seconds, error)
        self.counts[status] += 1
        self.progress.done(item.path.name, status)

    def _restart_clock(self) -> None:
        """The oldest prompt still in flight starts running now: its timeout counts from here."""
        first = next(iter(self.in_flight.values()), None)
        if first is not None:
            first.clock = max(first.clock, time.monotonic())

    def _check_timeouts(self) -> None:
        if not self.item_timeout:
            return
        for prompt_id, item in list(self.in_flight.items()):
            if time.monotonic() - item.clock > self.item_timeout:
                self.client.delete_queued([prompt_id])
                self.client.interrupt(prompt_id)
                self.in_flight.pop(prompt_id)
                self._restart_clock()
                self._failed(item, f"timed out after {self.item_timeout:g} s")

    # -- server restarts and Ctrl-C -------------------------------------------------------------
    def _recover(self) -> None:
        """Wait (with backoff) for the server, then resubmit in-flight prompts it no longer knows."""
        delay = 0.25
        while True:
            try:
                self._probe()
                self._events = self.client.events()
                running, queued = self.client.queue()
                break
            except ComfyConnectionError as e:
                self._close_events()
                waited = time.monotonic() - self._lost_since
                if waited + delay > self.reconnect_timeout or self._stop:
                    raise ServerGone(
                        f"ComfyUI did not come back within {self.reconnect_timeout:g} s: {e}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.info("server back after %.1f s", time.monotonic() - self._lost_since)
        self._lost_since = None
        lost = []
        for prompt_id in list(self.in_flight):
            entry = self.client.history(prompt_id)
            if entry is not None:
                self._finish(prompt_id, entry)
            elif prompt_id not in running and prompt_id not in queued:
                lost.append(self.in_flight.pop(prompt_id))
        for item in reversed(lost):  # resubmitting does not count as a failed attempt
            self.pending.appendleft(item)
            self.resubmitted += 1
        if lost:
            log.warning("resubmitting %d item(s) the server lost: %s", len(lost), [i.path.name for i in lost])

    def _probe(self) -> None:
        """GET /system_stats with a short timeout: a hung server must not eat the reconnect budget."""
        saved, self.client.timeout = self.client.timeout, min(self.client.timeout, 5.0)
        try:
            self.client.system_stats()
        finally:
            self.client.timeout = saved

    def _abort(self) -> None:
        """Ctrl-C: drop our queued prompts, interrupt our running one, record the in-flight items."""
        ids = list(self.in_flight)
        if ids:
            self.client.timeout = min(self.client.timeout, 5.0)
            try:
                self.client.delete_queued(ids)  # first, so the server does not start the next one
                running, _ = self.client.queue()
                for prompt_id in ids:
                    if prompt_id in running:  # never interrupt another client's prompt
                        self.client.interrupt(prompt_id)
            except ComfyError as e:
                log.warning("could not stop the server's work: %s", e)
        for item in list(self.in_flight.values()):
            self._record(item, "interrupted", [], "interrupted by the user")
        self.in_flight.clear()

    def _close_events(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def check_node_types(client: ComfyClient, workflow: dict) -> None:
    """ValueError naming the workflow's node types that the server does not have."""
    known = client.object_info()
    missing = sorted({n["class_type"] for n in workflow.values()} - set(known))
    if missing:
        raise ValueError(
            f"the server at {client.url} has no node type(s) {missing}: is the custom node pack installed "
            "and did it load (look for IMPORT FAILED in the ComfyUI log)?"
        )


def plan_items(
    workflow: dict, image_node: str, images: list[Path], params: dict[str, dict[str, str]]
) -> list[Item]:
    """One item per image with its CSV values applied (all rows checked before anything runs)."""
    known = {p.name for p in images} | {p.stem for p in images}
    unknown = sorted(set(params) - known)
    if unknown:
        log.warning("parameter CSV rows for images not in the input folder: %s", unknown[:10])
    return [Item(p, apply_params(workflow, params_for(params, p), image_node)) for p in images]


def run_batch(
    url: str,
    workflow_path: str | Path,
    input_dir: str | Path,
    out_dir: str | Path,
    *,
    image_node: str | None = None,
    params_csv: str | Path | None = None,
    results_csv: str | Path | None = None,
    retries: int = 1,
    concurrency: int = 1,
    item_timeout: float | None = None,
    reconnect_timeout: float = 120.0,
    upload_subfolder: str = "priorface_batch",
    overwrite: bool = False,
    progress: bool = True,
    client_id: str | None = None,
) -> dict:
    """Run ``workflow_path`` on every image of ``input_dir``; counts of success/error/skipped and flags."""
    workflow = load_workflow(workflow_path)
    node = find_image_node(workflow, image_node)
    out = Path(out_dir)
    images = list_images(input_dir)
    if out.resolve() == Path(input_dir).resolve():
        raise ValueError(f"the output folder must differ from the input folder, got {out} for both")
    params = read_params(params_csv) if params_csv else {}
    items = plan_items(workflow, node, images, params)
    results = ResultsTable(results_csv or out / "results.csv", fresh=overwrite)
    todo = [i for i in items if not results.finished(i.path.name, out)]
    skipped = len(items) - len(todo)
    client = ComfyClient(url, client_id=client_id)
    if todo:
        client.system_stats()  # fail fast with a clear message when nothing answers
        check_node_types(client, workflow)
    log.info(
        "%d image(s): %d to run, %d already finished; client id %s",
        len(items),
        len(todo),
        skipped,
        client.client_id,
    )
    started = time.monotonic()
    runner = BatchRunner(
        client,
        node,
        out,
        results,
        retries=retries,
        concurrency=concurrency,
        item_timeout=item_timeout,
        reconnect_timeout=reconnect_timeout,
        upload_subfolder=upload_subfolder,
        progress=Progress(len(todo), enabled=progress and bool(todo)),
    )
    summary = (
        runner.run(todo)
        if todo
        else {"success": 0, "error": 0, "interrupted": 0, "resubmitted": 0, "aborted": False}
    )
    if not results.path.is_file():
        results.save()
    return {
        **summary,
        "skipped": skipped,
        "seconds": time.monotonic() - started,
        "results": str(results.path),
    }
