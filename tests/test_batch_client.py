"""``priorface batch`` against a fake ComfyUI server (aiohttp on 127.0.0.1, real HTTP and websocket)."""

from __future__ import annotations

import ast
import asyncio
import csv
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pytest

web = pytest.importorskip("aiohttp.web")

from priorface.client import batch, batch_cli, comfy_api  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
KNOWN_NODES = {"LoadImage", "FakeSampler", "SaveImage", "PreviewImage"}
SEED_MAX = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workflow() -> dict:
    """A small API-format graph: load -> two samplers with a seed -> save + preview."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Photo"}},
        "2": {"class_type": "FakeSampler", "inputs": {"image": ["1", 0], "seed": 1, "strength": 0.5}},
        "3": {"class_type": "FakeSampler", "inputs": {"image": ["2", 0], "seed": 2, "strength": 1.0}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def expected_output(data: bytes, prompt: dict) -> bytes:
    """What the fake SaveImage writes: the uploaded bytes plus the values the samplers ran with."""
    values = [f"{k}:{prompt[k]['inputs']['seed']}:{prompt[k]['inputs']['strength']}" for k in ("2", "3")]
    return b"OUT[" + data + b"]" + ",".join(values).encode()


class FakeComfy:
    """ComfyUI 0.3.64's HTTP API and websocket messages, with scripted outcomes per input image.

    ``plan(image_name, attempt)`` returns "ok", "error", "restart" (the server dies mid-run and comes
    back with an empty queue), "slow" (progress every 0.25 s), "hang", or "sigint" (SIGINT to this
    process once another prompt is queued behind this one).
    """

    def __init__(self, plan=lambda name, attempt: "ok", down_for: float = 0.6):
        self.plan = plan
        self.down_for = down_for
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uploads: dict[str, bytes] = {}  # survive restarts, like the input folder on disk
        self.files: dict[tuple, bytes] = {}
        self.attempts: Counter = Counter()
        self.posted: list[dict] = []
        self.interrupts: list = []
        self.deleted: list[str] = []
        self.max_in_flight = 0
        self.restarts = 0
        self._counter = 0

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> FakeComfy:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def restart(self) -> None:
        self.stop()
        time.sleep(self.down_for)
        self.restarts += 1
        self.start()

    async def _start(self) -> None:
        self.queue: list[tuple[str, dict, str]] = []
        self.running: str | None = None
        self.history: dict[str, dict] = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.wakeup = asyncio.Event()
        self.interrupt_flag = False
        app = web.Application()
        app.add_routes(
            [
                web.get("/system_stats", self._system_stats),
                web.get("/object_info", self._object_info),
                web.post("/upload/image", self._upload),
                web.post("/prompt", self._prompt),
                web.get("/history/{pid}", self._history),
                web.get("/queue", self._get_queue),
                web.post("/queue", self._post_queue),
                web.post("/interrupt", self._interrupt),
                web.get("/view", self._view),
                web.get("/ws", self._ws),
            ]
        )
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.worker = asyncio.create_task(self._work())

    async def _stop(self) -> None:
        self.worker.cancel()
        for ws in list(self.sockets.values()):  # dropped like a crashed process, no close handshake
            ws.transport.abort()
        await self.runner.cleanup()

    # -- HTTP -----------------------------------------------------------------------------------
    async def _system_stats(self, request):
        return web.json_response({"system": {"comfyui_version": "fake"}, "devices": []})

    async def _object_info(self, request):
        return web.json_response({c: {"input": {}} for c in KNOWN_NODES})

    async def _upload(self, request):
        post = await request.post()
        field = post["image"]
        key = f"{post.get('subfolder', '')}/{field.filename}".lstrip("/")
        self.uploads[key] = field.file.read()
        return web.json_response(
            {"name": field.filename, "subfolder": post.get("subfolder", ""), "type": "input"}
        )

    async def _prompt(self, request):
        body = await request.json()
        prompt, client_id = body["prompt"], body.get("client_id", "")
        self.posted.append(prompt)
        unknown = [n["class_type"] for n in prompt.values() if n["class_type"] not in KNOWN_NODES]
        if unknown:
            error = {
                "type": "invalid_prompt",
                "message": f"Cannot execute because node {unknown[0]} does not exist.",
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        node_errors = {}
        for node_id, node in prompt.items():
            inputs = node["inputs"]
            errors = []
            if node["class_type"] == "LoadImage" and inputs["image"] not in self.uploads:
                errors.append(
                    {"type": "value_not_in_list", "message": "Value not in list", "details": "image"}
                )
            if isinstance(inputs.get("seed"), int) and inputs["seed"] > SEED_MAX:
                errors.append(
                    {
                        "type": "value_bigger_than_max",
                        "message": "Value bigger than max",
                        "details": f"seed: {inputs['seed']} is bigger than max of {SEED_MAX}",
                        "extra_info": {"input_name": "seed"},
                    }
                )
            if errors:
                node_errors[node_id] = {
                    "errors": errors,
                    "dependent_outputs": ["9"],
                    "class_type": node["class_type"],
                }
        if node_errors:
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
            }
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        prompt_id = str(uuid.uuid4())
        self.queue.append((prompt_id, prompt, client_id))
        self.max_in_flight = max(self.max_in_flight, len(self.queue) + (self.running is not None))
        self.wakeup.set()
        return web.json_response({"prompt_id": prompt_id, "number": len(self.posted), "node_errors": {}})

    async def _history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def _get_queue(self, request):
        running = [[0, self.running, {}, {}, []]] if self.running else []
        return web.json_response(
            {"queue_running": running, "queue_pending": [[1, p, {}, {}, []] for p, _, _ in self.queue]}
        )

    async def _post_queue(self, request):
        body = await request.json()
        for pid in body.get("delete", []):
            self.deleted.append(pid)
            self.queue = [q for q in self.queue if q[0] != pid]
        return web.Response()

    async def _interrupt(self, request):
        body = await request.json()
        self.interrupts.append(body.get("prompt_id"))
        if body.get("prompt_id") in (None, self.running):
            self.interrupt_flag = True
        return web.Response()

    async def _view(self, request):
        key = (request.query["filename"], request.query.get("subfolder", ""), request.query.get("type"))
        if key not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[key], content_type="image/png")

    async def _ws(self, request):
        ws = web.WebSocketResponse(timeout=0.5)
        await ws.prepare(request)
        ws.transport = request.transport
        client_id = request.query.get("clientId", "")
        self.sockets[client_id] = ws
        await ws.send_json(
            {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}}
        )
        async for _ in ws:
            pass
        self.sockets.pop(client_id, None)
        return ws

    # -- execution ------------------------------------------------------------------------------
    async def _send(self, client_id: str, kind: str, data: dict) -> None:
        ws = self.sockets.get(client_id)
        if ws is not None and not ws.closed:
            await ws.send_str(json.dumps({"type": kind, "data": data}))
            await ws.send_bytes(b"\x00\x00\x00\x01preview")  # previews are binary frames

    async def _work(self) -> None:
        while True:
            while not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            prompt_id, prompt, client_id = self.queue.pop(0)
            self.running = prompt_id
            self.interrupt_flag = False
            try:
                entry = await self._execute(prompt_id, prompt, client_id)
            finally:
                self.running = None
            await asyncio.sleep(0.02)  # history is written just after the last messages
            self.history[prompt_id] = entry

    async def _execute(self, pid: str, prompt: dict, cid: str) -> dict:
        image = prompt["1"]["inputs"]["image"]
        name = image.rsplit("/", 1)[-1]
        self.attempts[name] += 1
        outcome = self.plan(name, self.attempts[name])
        await self._send(cid, "execution_start", {"prompt_id": pid})
        await self._send(cid, "executing", {"node": "1", "prompt_id": pid})
        await self._send(cid, "executing", {"node": "2", "prompt_id": pid})
        if outcome == "restart":
            threading.Thread(target=self.restart, daemon=True).start()
            await asyncio.sleep(30)  # cancelled by the restart
        if outcome == "sigint":
            for _ in range(250):
                if self.queue:
                    break
                await asyncio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
        steps, delay = {"slow": (5, 0.25), "hang": (200, 0.05), "sigint": (200, 0.05)}.get(
            outcome, (3, 0.005)
        )
        for step in range(1, steps + 1):
            if self.interrupt_flag:
                data = {"prompt_id": pid, "node_id": "2", "node_type": "FakeSampler", "executed": ["1"]}
                await self._send(cid, "execution_interrupted", data)
                return self._entry(prompt, "error", {}, [["execution_interrupted", data]])
            await asyncio.sleep(delay)
            await self._send(cid, "progress", {"value": step, "max": steps, "node": "2", "prompt_id": pid})
        if outcome == "error":
            data = {
                "prompt_id": pid,
                "node_id": "3",
                "node_type": "FakeSampler",
                "exception_type": "RuntimeError",
                "exception_message": f"no face found in {name}\n",
                "traceback": ["..."],
            }
            await self._send(cid, "execution_error", data)
            return self._entry(prompt, "error", {}, [["execution_start", {}], ["execution_error", data]])
        self._counter += 1
        filename = f"x_{self._counter:05d}_.png"
        self.files[(filename, "", "output")] = expected_output(self.uploads[image], prompt)
        outputs = {
            "9": {"images": [{"filename": filename, "subfolder": "", "type": "output"}]},
            "10": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]},
        }
        await self._send(cid, "executed", {"node": "9", "output": outputs["9"], "prompt_id": pid})
        await self._send(cid, "execution_success", {"prompt_id": pid})
        await self._send(cid, "executing", {"node": None, "prompt_id": pid})
        return self._entry(prompt, "success", outputs, [["execution_success", {}]])

    @staticmethod
    def _entry(prompt, status, outputs, messages) -> dict:
        return {
            "prompt": [0, "id", prompt, {}, []],
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
        }


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def fake():
    servers = []

    def make(plan=lambda name, attempt: "ok", **kw):
        server = FakeComfy(plan, **kw).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def job(tmp_path):
    """Three input images (arbitrary bytes: the fake never decodes them) and the workflow file."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        (inputs / name).write_bytes(f"pixels of {name}".encode())
    (inputs / "notes.txt").write_text("not an image")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(workflow()))
    return Namespace(inputs=inputs, out=tmp_path / "out", workflow=wf, tmp=tmp_path)


def run(server, job, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("reconnect_timeout", 10.0)
    return batch.run_batch(server.url, job.workflow, job.inputs, job.out, **kw)


def rows(job, name="results.csv") -> dict:
    with (job.out / name).open(newline="") as f:
        return {r["input"]: r for r in csv.DictReader(f)}


def cli_args(server, job, **kw) -> Namespace:
    parser = batch_cli.argparse.ArgumentParser()
    batch_cli.add_batch_arguments(parser)
    args = parser.parse_args(
        [str(job.workflow), str(job.inputs), str(job.out), "--url", server.url, "--no-progress"]
    )
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# -- tests against the fake server ---------------------------------------------------------------
def test_batch_success_with_params_then_resume(fake, job):
    server = fake()
    params = job.tmp / "params.csv"
    params.write_text("input,seed,3.seed\na.png,7,\nb,,9\n")
    summary = run(server, job, params_csv=params)
    assert (summary["success"], summary["error"], summary["skipped"]) == (3, 0, 0)
    assert server.max_in_flight == 1  # default concurrency
    table = rows(job)
    assert sorted(table) == ["a.png", "b.jpg", "c.png"]
    assert {r["status"] for r in table.values()} == {"success"}
    # the uploaded image went into the LoadImage node; `seed` hit both samplers, `3.seed` one only
    by_image = {p["1"]["inputs"]["image"]: p for p in server.posted}
    assert sorted(by_image) == ["priorface_batch/a.png", "priorface_batch/b.jpg", "priorface_batch/c.png"]
    assert [by_image["priorface_batch/a.png"][k]["inputs"]["seed"] for k in "23"] == [7, 7]
    assert [by_image["priorface_batch/b.jpg"][k]["inputs"]["seed"] for k in "23"] == [1, 9]
    for name in ("a.png", "b.jpg", "c.png"):
        stem = name.split(".")[0]
        assert table[name]["outputs"] == f"{stem}_9_0.png"  # only type "output", not the preview
        expected = expected_output(f"pixels of {name}".encode(), by_image[f"priorface_batch/{name}"])
        assert (job.out / f"{stem}_9_0.png").read_bytes() == expected
    assert not list(job.out.glob(".*.part"))

    posted = len(server.posted)
    again = run(server, job, params_csv=params)
    assert (again["success"], again["skipped"], len(server.posted)) == (0, 3, posted)
    (job.out / "b_9_0.png").unlink()  # a missing output file makes the item run again
    again = run(server, job, params_csv=params)
    assert (again["success"], again["skipped"]) == (1, 2)
    assert (job.out / "b_9_0.png").is_file()


def test_validation_error_is_recorded_with_node_errors_and_not_retried(fake, job):
    server = fake()
    params = job.tmp / "params.csv"
    params.write_text("input,2.seed\nb.jpg,5000\n")
    summary = run(server, job, params_csv=params, retries=2)
    assert (summary["success"], summary["error"]) == (2, 1)
    row = rows(job)["b.jpg"]
    assert row["status"] == "error" and row["outputs"] == ""
    assert "value_bigger_than_max" in row["error"] and "node 2 (FakeSampler) input 'seed'" in row["error"]
    assert "5000" in row["error"]
    assert len(server.posted) == 3  # no retry of a graph that cannot validate


def test_execution_error_is_retried_then_recorded(fake, job):
    server = fake(
        lambda name, attempt: "error" if name == "b.jpg" or (name == "c.png" and attempt == 1) else "ok"
    )
    code = batch_cli.run_batch_cli(cli_args(server, job, retries=1))
    assert code == batch_cli.EXIT_FAILED_ITEMS
    table = rows(job)
    assert table["b.jpg"]["status"] == "error"
    assert table["b.jpg"]["error"] == "RuntimeError: no face found in b.jpg at node 3 (FakeSampler)"
    assert table["c.png"]["status"] == "success" and table["a.png"]["status"] == "success"
    assert server.attempts == Counter({"a.png": 1, "b.jpg": 2, "c.png": 2})


def test_server_restart_mid_batch_resubmits_the_lost_item(fake, job):
    server = fake(lambda name, attempt: "restart" if name == "b.jpg" and attempt == 1 else "ok")
    summary = run(server, job, retries=0)
    assert (summary["success"], summary["error"], summary["resubmitted"]) == (3, 0, 1)
    assert server.restarts == 1
    assert server.attempts["b.jpg"] == 2
    assert {r["status"] for r in rows(job).values()} == {"success"}


def test_server_gone_for_good_gives_up_after_the_reconnect_timeout(fake, job):
    server = fake(lambda name, attempt: "restart" if name == "b.jpg" else "ok", down_for=60)
    server.restart = server.stop  # dies and never comes back
    args = cli_args(server, job, reconnect_timeout=1.0)
    t0 = time.monotonic()
    assert batch_cli.run_batch_cli(args) == batch_cli.EXIT_SERVER_LOST
    assert time.monotonic() - t0 < 8
    table = rows(job)
    assert table["a.png"]["status"] == "success" and "b.jpg" not in table


def test_slow_progress_is_followed_and_a_hung_item_times_out(fake, job):
    server = fake(lambda name, attempt: {"b.jpg": "slow", "c.png": "hang"}.get(name, "ok"))
    stream = io.StringIO()
    client = comfy_api.ComfyClient(server.url)
    wf = workflow()
    items = [batch.Item(p, wf) for p in batch.list_images(job.inputs)]
    progress = batch.Progress(len(items), enabled=True, stream=stream)
    progress._bar = None  # the plain stderr line, as without tqdm
    results = batch.ResultsTable(job.out / "results.csv")
    runner = batch.BatchRunner(client, "1", job.out, results, retries=0, item_timeout=2.0, progress=progress)
    summary = runner.run(items)
    assert (summary["success"], summary["error"]) == (2, 1)
    table = rows(job)
    assert table["b.jpg"]["status"] == "success" and float(table["b.jpg"]["seconds"]) >= 1.2
    assert table["c.png"]["error"] == "timed out after 2 s"
    assert server.interrupts and server.interrupts[-1] is not None  # a targeted interrupt
    text = stream.getvalue()
    assert "b.jpg: node 2 FakeSampler 3/5" in text or "b.jpg: node 2 FakeSampler 4/5" in text
    assert "3/3 done, 1 failed" in text


def test_without_websocket_client_it_polls_history(fake, job, monkeypatch):
    monkeypatch.setattr(comfy_api, "_websocket_module", lambda: None)
    server = fake(lambda name, attempt: "error" if name == "a.png" else "ok")
    summary = run(server, job, retries=0)
    assert (summary["success"], summary["error"]) == (2, 1)
    assert "no face found in a.png" in rows(job)["a.png"]["error"]


def test_ctrl_c_interrupts_the_server_and_leaves_a_consistent_csv(fake, job):
    server = fake(lambda name, attempt: "sigint" if name == "b.jpg" and attempt == 1 else "ok")
    code = batch_cli.run_batch_cli(cli_args(server, job, concurrency=2))
    assert code == batch_cli.EXIT_INTERRUPTED
    assert server.max_in_flight == 2
    by_image = {p["1"]["inputs"]["image"].rsplit("/", 1)[-1]: i for i, p in enumerate(server.posted)}
    assert set(by_image) == {"a.png", "b.jpg", "c.png"}
    assert len(server.deleted) == 2 and len(server.interrupts) == 1  # both dropped, the running one stopped
    table = rows(job)
    assert table["a.png"]["status"] == "success"
    assert table["b.jpg"]["status"] == table["c.png"]["status"] == "interrupted"
    assert not list(job.out.glob(".*.part"))
    time.sleep(0.1)  # the fake reports the interrupted prompt
    assert batch_cli.run_batch_cli(cli_args(server, job)) == 0  # the rerun finishes the rest
    assert {r["status"] for r in rows(job).values()} == {"success"}
    assert server.attempts == Counter({"a.png": 1, "b.jpg": 2, "c.png": 1})


def test_unknown_node_type_and_unreachable_server(fake, job):
    server = fake()
    wf = workflow()
    wf["3"]["class_type"] = "PriorFaceMissing"
    job.workflow.write_text(json.dumps(wf))
    with pytest.raises(ValueError, match=r"no node type\(s\) \['PriorFaceMissing'\].*IMPORT FAILED"):
        run(server, job)
    args = cli_args(server, job, url=f"http://127.0.0.1:{_free_port()}")
    assert batch_cli.run_batch_cli(args) == batch_cli.EXIT_SERVER_LOST


# -- offline units -------------------------------------------------------------------------------
def test_ui_format_workflow_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"UI-format.*Export \(API\).*comfy run --workflow.*ui_to_api"):
        batch.load_workflow(REPO_ROOT / "workflows" / "face_crop_and_paste.json")
    api = batch.load_workflow(REPO_ROOT / "workflows" / "api" / "face_crop_and_paste.json")
    assert batch.find_image_node(api) == "1"


def test_image_node_choice():
    wf = workflow()
    wf["5"] = {"class_type": "LoadImage", "inputs": {"image": "b.png"}, "_meta": {"title": "Reference"}}
    with pytest.raises(
        ValueError, match=r"several LoadImage nodes: 1 \(Photo\), 5 \(Reference\).*--image-node"
    ):
        batch.find_image_node(wf)
    assert batch.find_image_node(wf, "5") == "5"
    with pytest.raises(ValueError, match="no such node"):
        batch.find_image_node(wf, "42")
    with pytest.raises(ValueError, match="has no 'image' input"):
        batch.find_image_node(wf, "9")


def test_csv_columns_map_to_inputs():
    wf = workflow()
    out = batch.apply_params(wf, {"strength": "0.25", "3.seed": "11", "Photo.image": "x.png"}, "1")
    assert [out[k]["inputs"]["strength"] for k in "23"] == [0.25, 0.25]
    assert [out[k]["inputs"]["seed"] for k in "23"] == [1, 11]
    assert out["1"]["inputs"]["image"] == "x.png" and wf["3"]["inputs"]["seed"] == 2  # a copy
    with pytest.raises(ValueError, match="matches no node input"):
        batch.apply_params(wf, {"cfg": "7"}, "1")
    with pytest.raises(ValueError, match="expected int, got 'abc'"):
        batch.apply_params(wf, {"seed": "abc"}, "1")
    with pytest.raises(ValueError, match="linked to another node"):
        batch.apply_params(wf, {"3.image": "x"}, "1")
    with pytest.raises(ValueError, match="has no input 'steps'"):
        batch.apply_params(wf, {"2.steps": "3"}, "1")


def test_summaries_of_server_errors():
    body = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {
            "3": {
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": "detector: 'x' not in ['dlib']",
                        "extra_info": {"input_name": "detector"},
                    }
                ],
                "class_type": "PriorFaceDetectFaces",
            }
        },
    }
    assert comfy_api.summarize_prompt_error(body) == (
        "Prompt outputs failed validation; node 3 (PriorFaceDetectFaces) input 'detector': "
        "value_not_in_list: detector: 'x' not in ['dlib']"
    )
    assert batch.output_name("photo", "12:3", 1, "x_00001_.webp") == "photo_12-3_1.webp"


def test_client_imports_only_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"websocket", "tqdm"}  # tqdm: optional, lazily
    for path in sorted((REPO_ROOT / "client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
