"""``lemoe serve STORE``: the editing service, an HTTP/JSON API over one edit store.

Standard library only (``ThreadingHTTPServer``): no extra dependency, and full control of the
limits that matter for an editing service -- the body size is checked from ``Content-Length``
before a byte is read, every error is a JSON 4xx with a message, and nothing a client sends can
reach the journal without passing :func:`lemoe.store.parse_submission`.

Concurrency: HTTP threads validate and *accept* edits (one short SQLite transaction) and read the
journal; one writer thread applies accepted edits in batches, runs rollbacks, and publishes each new
state to the serving replicas, so generation keeps being served while a batch is applied.

API (all JSON; every route but ``/v1/health`` needs ``Authorization: Bearer TOKEN``):

=====  ====================  ==========================================================
GET    /v1/health            liveness, no auth
GET    /v1/store             model, method, counts, writer state
POST   /v1/edits             ``{"requests": [...]}`` (or one request object) -> 202 + seqs
GET    /v1/edits             ``?status=&after=&limit=`` -> edits in arrival order
GET    /v1/edits/{seq}       one edit and its status
GET    /v1/batches           batches and their status
POST   /v1/rollback          ``{"batch": N}`` or ``{"after": N}``, optional ``"replay": true``
POST   /v1/generate          ``{"prompt": "...", "max_new_tokens": 20}`` with the edited model
=====  ====================  ==========================================================
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lemoe.methods.base import EditMethod, RollbackNotSupported
from lemoe.requests import InvalidRequestError
from lemoe.service.replicas import GenerationBatcher, ServingReplicas
from lemoe.store import DuplicateEditError, EditStore, StoreBusyError, StoreError, parse_submission
from lemoe.store.journal import EDIT_STATUSES

log = logging.getLogger("lemoe.service")

MAX_GENERATE_PROMPT_CHARS = 2000


@dataclass
class ServiceConfig:
    token: str
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port
    max_body_bytes: int = 1 << 20
    max_requests_per_submit: int = 64
    max_queued_edits: int = 10_000
    max_new_tokens: int = 64
    max_generate_batch: int = 16  # concurrent generate requests served in one padded batch
    rollback_timeout_s: float = 600.0
    generate_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or len(self.token) < 8:
            raise ValueError("the service token must be a string of at least 8 characters")


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class EditService:
    """The store, the serving replicas and the writer thread. ``start()`` serves; ``stop()`` ends."""

    def __init__(self, store: EditStore, config: ServiceConfig, make_replica: Callable[[], EditMethod]) -> None:
        self.store = store
        self.config = config
        self.replicas = ServingReplicas(make_replica)
        self.generator = GenerationBatcher(self.replicas, config.max_generate_batch)
        self._jobs: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._version = 0
        self.writer_busy = False
        self.writer_error: str | None = None
        self._publish()
        self._writer = threading.Thread(target=self._writer_loop, name="lemoe-writer", daemon=True)
        self._httpd: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        handler = type("Handler", (_Handler,), {"service": self})
        self._httpd = ThreadingHTTPServer((self.config.host, self.config.port), handler)
        self._httpd.daemon_threads = True
        self._writer.start()
        self._http_thread = threading.Thread(target=self._httpd.serve_forever, name="lemoe-http", daemon=True)
        self._http_thread.start()
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting requests, let the writer finish its current batch, then return."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self._stop.set()
        self.wake()
        if self._writer.is_alive():
            self._writer.join()
        self.generator.close()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # -- the writer ---------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._version += 1
        self.replicas.publish(self.store.method.state_dict(), self.store.method.state_meta(), self._version)

    def _writer_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if not self._jobs and not self.store.pending_count():
                    self._wake.wait(timeout=0.5)
                job = self._jobs.popleft() if self._jobs else None
            self.writer_busy = True
            try:
                if job is not None:
                    fn, future = job
                    try:
                        future.set_result(fn())
                    except Exception as e:
                        future.set_exception(e)
                    self._publish()
                    continue
                if self.store.apply_pending(max_batches=1):
                    self._publish()
            except Exception as e:  # a failed batch is marked failed in the journal; keep serving
                self.writer_error = f"{type(e).__name__}: {e}"
                log.exception("writer: batch failed")
                self._publish()
            finally:
                self.writer_busy = False

    def run_in_writer(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the writer thread (between batches) and wait for its result."""
        future: Future[Any] = Future()
        with self._wake:
            self._jobs.append((fn, future))
            self._wake.notify_all()
        return future.result(timeout=self.config.rollback_timeout_s)

    # -- API operations (called from HTTP threads) ---------------------------------------------------
    def submit(self, payload: Any) -> dict[str, Any]:
        try:
            requests = parse_submission(payload, max_requests=self.config.max_requests_per_submit)
            done = self.store.submit(requests, max_queued=self.config.max_queued_edits)
        except InvalidRequestError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        except DuplicateEditError as e:
            raise ApiError(409, "duplicate_request_id", str(e)) from None
        except StoreBusyError as e:
            raise ApiError(429, "queue_full", str(e)) from None
        self.wake()
        return {"edits": [{"seq": d.seq, "request_id": d.request_id, "duplicate": d.duplicate} for d in done]}

    def rollback(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict) or len(set(payload) & {"batch", "after"}) != 1:
            raise ApiError(422, "invalid_rollback", 'give exactly one of "batch" or "after" (integers)')
        if set(payload) - {"batch", "after", "replay"}:
            extra = sorted(set(payload) - {"batch", "after", "replay"})
            raise ApiError(422, "invalid_rollback", f"unknown field(s) {extra}")
        key = "batch" if "batch" in payload else "after"
        point, replay = payload[key], payload.get("replay", False)
        if not _is_int(point) or point < 0 or point > 2**62:
            raise ApiError(422, "invalid_rollback", f"{key} must be a non-negative integer")
        if not isinstance(replay, bool):
            raise ApiError(422, "invalid_rollback", "replay must be true or false")
        if key == "batch":
            fn = lambda: self.store.rollback([point], replay=replay)  # noqa: E731
        else:
            fn = lambda: self.store.rollback_after(point, replay=replay)  # noqa: E731
        try:
            undone = self.run_in_writer(fn)
        except RollbackNotSupported as e:
            raise ApiError(409, "rollback_not_supported", str(e)) from None
        except StoreError as e:
            raise ApiError(409, "rollback_refused", str(e)) from None
        return {"rolled_back": undone}

    def generate(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict) or "prompt" not in payload or set(payload) - {"prompt", "max_new_tokens"}:
            raise ApiError(422, "invalid_generate", 'expected {"prompt": str, "max_new_tokens": int}')
        prompt, n = payload["prompt"], payload.get("max_new_tokens", min(20, self.config.max_new_tokens))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(422, "invalid_generate", "prompt must be a non-empty string")
        if len(prompt) > MAX_GENERATE_PROMPT_CHARS or "\x00" in prompt or not _encodable(prompt):
            limit = MAX_GENERATE_PROMPT_CHARS
            raise ApiError(422, "invalid_generate", f"prompt must be valid text of at most {limit} characters")
        if not _is_int(n) or not 1 <= n <= self.config.max_new_tokens:
            top = self.config.max_new_tokens
            raise ApiError(422, "invalid_generate", f"max_new_tokens must be an integer in 1..{top}")
        text, version = self.generator.submit(prompt, n).result(timeout=self.config.generate_timeout_s)
        return {"text": text, "state_version": version}

    def list_edits(self, query: dict[str, list[str]]) -> dict[str, Any]:
        unknown = set(query) - {"status", "after", "limit"}
        if unknown:
            raise ApiError(400, "bad_query", f"unknown query parameter(s) {sorted(unknown)}")
        status = _one(query, "status")
        if status is not None and status not in EDIT_STATUSES:
            raise ApiError(400, "bad_query", f"status must be one of {', '.join(EDIT_STATUSES)}")
        after = _int_param(query, "after", 0, 0, 2**62)
        limit = _int_param(query, "limit", 100, 1, 1000)
        rows = self.store.edits(status=status, after=after, limit=limit)
        return {"edits": [r.summary() for r in rows]}

    def get_edit(self, seq: int) -> dict[str, Any]:
        row = self.store.edit(seq)
        if row is None:
            raise ApiError(404, "not_found", f"no edit {seq}")
        return row.summary()

    def list_batches(self) -> dict[str, Any]:
        return {
            "batches": [
                {
                    "batch": b.batch_id,
                    "status": b.status,
                    "created_at": b.created_at,
                    "applied_at": b.applied_at,
                    "rolled_back_at": b.rolled_back_at,
                }
                for b in self.store.batches()
            ]
        }

    def info(self) -> dict[str, Any]:
        return {
            **self.store.info(),
            "writer_busy": self.writer_busy,
            "writer_error": self.writer_error,
            "state_version": self._version,
        }


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "bad_query", f"{name} given more than once")
    return values[0]


def _int_param(query: dict[str, list[str]], name: str, default: int, lo: int, hi: int) -> int:
    text = _one(query, name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", text) or not lo <= int(text) <= hi:
        raise ApiError(400, "bad_query", f"{name} must be an integer in {lo}..{hi}")
    return int(text)


_EDIT_PATH = re.compile(r"/v1/edits/([0-9]{1,19})")
_ROUTES: dict[str, set[str]] = {
    "/v1/health": {"GET"},
    "/v1/store": {"GET"},
    "/v1/edits": {"GET", "POST"},
    "/v1/batches": {"GET"},
    "/v1/rollback": {"POST"},
    "/v1/generate": {"POST"},
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lemoe"
    timeout = 60  # seconds a client may take to send its request
    service: EditService

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def __getattr__(self, name: str) -> Any:
        # Any other verb (PUT, DELETE, FOO...) is a 405, not http.server's 501.
        if name.startswith("do_"):
            return lambda: self._handle(name[3:])
        raise AttributeError(name)

    def _handle(self, verb: str) -> None:
        try:
            status, body = self._route(verb)
        except ApiError as e:
            status, body = e.status, {"error": {"code": e.code, "message": e.message}}
        except Exception as e:  # a bug: report it honestly as a 500, never crash the thread
            log.exception("internal error")
            status, body = 500, {"error": {"code": "internal", "message": f"{type(e).__name__}: {e}"}}
        self._send(status, body)

    def _route(self, verb: str) -> tuple[int, Any]:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        match = _EDIT_PATH.fullmatch(path)
        allowed = {"GET"} if match else _ROUTES.get(path)
        payload = self._read_body(verb)  # always consume the body so keep-alive stays in sync
        if allowed is None:
            raise ApiError(404, "not_found", f"no route {path!r}")
        if verb not in allowed:
            raise ApiError(405, "method_not_allowed", f"{verb} {path}: allowed {', '.join(sorted(allowed))}")
        if path == "/v1/health":
            return 200, {"status": "ok"}
        self._authenticate()
        if verb == "POST" and payload is None:
            raise ApiError(400, "missing_body", "this route needs a JSON body")
        svc = self.service
        if match:
            return 200, svc.get_edit(int(match.group(1)))
        query = parse_qs(url.query, keep_blank_values=True)
        if path != "/v1/edits" and query:
            raise ApiError(400, "bad_query", f"{path} takes no query parameters")
        if path == "/v1/store":
            return 200, svc.info()
        if path == "/v1/batches":
            return 200, svc.list_batches()
        if path == "/v1/edits":
            return (202, svc.submit(payload)) if verb == "POST" else (200, svc.list_edits(query))
        if path == "/v1/rollback":
            return 200, svc.rollback(payload)
        return 200, svc.generate(payload)

    def _authenticate(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), self.service.config.token.encode()
        ):
            raise ApiError(401, "unauthorized", "missing or wrong token (Authorization: Bearer TOKEN)")

    def _read_body(self, verb: str) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "length_required", "chunked bodies are not accepted; send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if verb == "POST":
                self.close_connection = True
                raise ApiError(411, "length_required", "POST needs a Content-Length header")
            return None
        if not re.fullmatch(r"[0-9]{1,19}", length_text.strip()):
            self.close_connection = True
            raise ApiError(400, "bad_length", "Content-Length must be a non-negative integer")
        length = int(length_text)
        if length > self.service.config.max_body_bytes:
            self.close_connection = True
            limit = self.service.config.max_body_bytes
            raise ApiError(413, "too_large", f"body of {length} bytes; the limit is {limit}")
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length:
            self.close_connection = True
            raise ApiError(400, "short_body", "the body ended before Content-Length bytes")
        if not raw:
            return None
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "bad_encoding", "the body is not UTF-8") from None
        except RecursionError:
            raise ApiError(400, "bad_json", "JSON nested too deeply") from None
        except ValueError as e:
            raise ApiError(400, "bad_json", f"malformed JSON: {e}") from None

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, ensure_ascii=True).encode("ascii")  # ASCII: safe for any text
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="lemoe"')
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def wait_until_idle(service: EditService, timeout_s: float = 600.0) -> bool:
    """Block until every accepted edit is applied (for tests and the load benchmark)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = service.store.counts()
        if not counts["accepted"] and not counts["pending"] and not service.writer_busy:
            return True
        time.sleep(0.05)
    return False
