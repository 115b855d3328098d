"""HTTP and websocket calls to a running ComfyUI server, standard library only.

The websocket (live progress) needs the small ``websocket-client`` package; without it
:meth:`ComfyClient.events` returns None and callers poll ``/history`` instead.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import uuid
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode, urlsplit
from urllib.request import ProxyHandler, Request, build_opener

log = logging.getLogger(__name__)


class ComfyError(Exception):
    """A request that ComfyUI answered with an error."""

    def __init__(self, message: str, status: int | None = None, body: object = None):
        super().__init__(message)
        self.status = status
        self.body = body


class ComfyValidationError(ComfyError):
    """HTTP 400 from POST /prompt: the graph failed validation (retrying cannot help)."""


class ComfyConnectionError(ComfyError, ConnectionError):
    """The server could not be reached, or it dropped the connection (e.g. it restarted)."""


def summarize_prompt_error(body: object) -> str:
    """One line from a POST /prompt error body: the error message plus each node's failed inputs."""
    if not isinstance(body, dict):
        return str(body)[:500]
    error = body.get("error")
    parts = []
    if isinstance(error, dict):
        parts.append(error.get("message") or error.get("type") or "error")
        if error.get("details"):
            parts[-1] += f": {error['details']}"
    elif error:
        parts.append(str(error))
    for node_id, info in (body.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            name = (err.get("extra_info") or {}).get("input_name")
            where = f"node {node_id} ({info.get('class_type', '?')})" + (f" input '{name}'" if name else "")
            text = err.get("details") or err.get("message") or err.get("type", "")
            parts.append(f"{where}: {err.get('type', 'error')}: {text}")
    return "; ".join(parts) or "invalid prompt"


def summarize_execution_error(data: dict) -> str:
    """One line from an ``execution_error`` message (websocket or history)."""
    where = f"node {data.get('node_id', '?')} ({data.get('node_type', '?')})"
    return (
        f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()} at {where}"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _websocket_module():
    """The ``websocket`` module of websocket-client, or None when it is not installed."""
    try:
        import websocket
    except ImportError:
        return None
    return websocket if hasattr(websocket, "create_connection") else None


class EventStream:
    """The ``/ws`` message stream of one client id: JSON messages as dicts, previews skipped."""

    def __init__(self, ws, module):
        self._ws = ws
        self._mod = module

    def next(self, timeout: float) -> dict | None:
        """The next JSON message, or None when none came within ``timeout`` seconds."""
        self._ws.settimeout(max(timeout, 0.001))
        try:
            while True:
                frame = self._ws.recv()
                if isinstance(frame, bytes):  # binary frames are image previews
                    continue
                if not frame:
                    raise ComfyConnectionError("websocket closed by the server")
                try:
                    return json.loads(frame)
                except ValueError:
                    log.debug("ignoring a non-JSON websocket frame: %.80r", frame)
        except (TimeoutError, self._mod.WebSocketTimeoutException):
            return None
        except (self._mod.WebSocketException, OSError) as e:
            raise ComfyConnectionError(f"websocket lost: {e}") from e

    def close(self) -> None:
        """Close the connection, ignoring errors (it may be gone already)."""
        try:
            self._ws.close()
        except Exception:  # noqa: BLE001 - best effort on a connection that may be dead
            pass


class ComfyClient:
    """Calls to one ComfyUI server (``url`` like ``http://127.0.0.1:8188``) under one client id."""

    def __init__(self, url: str, client_id: str | None = None, timeout: float = 30.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"ComfyUI URL must look like http://127.0.0.1:8188, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        # A proxy from the environment must not swallow requests to a local server.
        handlers = [ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = build_opener(*handlers)

    # -- plumbing -------------------------------------------------------------------------------
    def request(
        self, method: str, path: str, data: bytes | None = None, headers: dict | None = None
    ) -> bytes:
        """Send one request; raise ComfyConnectionError when unreachable, ComfyError on an HTTP error."""
        req = Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            if e.code == 400 and path == "/prompt":
                raise ComfyValidationError(summarize_prompt_error(body), e.code, body) from None
            raise ComfyError(
                f"{method} {path}: HTTP {e.code}: {summarize_prompt_error(body)}", e.code, body
            ) from None
        except (URLError, HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ComfyConnectionError(f"{method} {self.url}{path}: {reason}") from e

    def get_json(self, path: str):
        """GET a JSON document."""
        return json.loads(self.request("GET", path) or b"null")

    def post_json(self, path: str, payload) -> object:
        """POST a JSON body; the decoded JSON answer (None when the body is empty)."""
        raw = self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        return json.loads(raw) if raw.strip() else None

    # -- API ------------------------------------------------------------------------------------
    def system_stats(self) -> dict:
        """GET /system_stats (a cheap liveness check)."""
        return self.get_json("/system_stats")

    def object_info(self, class_type: str | None = None) -> dict:
        """GET /object_info (all node definitions, or one class)."""
        return self.get_json("/object_info" + (f"/{quote(class_type)}" if class_type else ""))

    def upload_image(self, path: str | Path, subfolder: str = "", name: str | None = None) -> str:
        """Upload a file to the server's input folder (overwriting); the value LoadImage expects."""
        path = Path(path)
        name = name or path.name
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        fields = {"type": "input", "overwrite": "true", "subfolder": subfolder}
        body = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        body += path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        raw = self.request(
            "POST", "/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        info = json.loads(raw)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt under this client id; the prompt id (ComfyValidationError on HTTP 400)."""
        answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ComfyError(f"POST /prompt: unexpected answer {answer!r}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of a finished prompt, or None while it is queued or running."""
        return (self.get_json(f"/history/{quote(prompt_id)}") or {}).get(prompt_id)

    def queue(self) -> tuple[list[str], list[str]]:
        """Ids of the running and of the pending prompts (GET /queue)."""
        q = self.get_json("/queue") or {}
        return [i[1] for i in q.get("queue_running", [])], [i[1] for i in q.get("queue_pending", [])]

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        """The bytes of an output file (GET /view)."""
        query = urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        return self.request("GET", f"/view?{query}")

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt; with a prompt id, servers that support it stop only that prompt."""
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def delete_queued(self, prompt_ids: list[str]) -> None:
        """Remove prompts that have not started yet from the queue (POST /queue delete)."""
        if prompt_ids:
            self.post_json("/queue", {"delete": list(prompt_ids)})

    def events(self) -> EventStream | None:
        """Open the websocket of this client id; None when websocket-client is not installed."""
        mod = _websocket_module()
        if mod is None:
            return None
        ws_url = "ws" + self.url[4:] + f"/ws?clientId={quote(self.client_id)}"
        try:
            ws = mod.create_connection(ws_url, timeout=self.timeout)
        except (mod.WebSocketException, OSError) as e:
            raise ComfyConnectionError(f"websocket {ws_url}: {e}") from e
        return EventStream(ws, mod)
