"""``lemoe serve STORE``: the editing service over one edit store.

:class:`EditService` holds the store, the serving replicas, the generation batcher and the writer
thread; :mod:`lemoe.service.app` is its HTTP layer (FastAPI, run by uvicorn on a thread of its own,
TLS through uvicorn's certificate options). Concurrency: request handlers validate and *accept*
edits (one short SQLite transaction) and read the journal; one writer thread applies accepted
edits in batches, runs rollbacks, and publishes each new state to the serving replicas, so
generation keeps being served while a batch is applied.

API (JSON; every route but ``/v1/health``, the schema and the console needs ``Authorization: Bearer TOKEN``;
the full schema is served at ``/openapi.json``, browsable at ``/docs``):

=====  =========================  ====================================================================
GET    /v1/health                 liveness, no auth
GET    /v1/store                  model, method, counts, writer state
POST   /v1/edits                  ``{"requests": [...]}`` (or one request object) -> 202 + seqs
GET    /v1/edits                  ``?status=&after=&limit=`` -> edits in arrival order
GET    /v1/edits/{seq}            one edit and its status
GET    /v1/batches                batches and their status
POST   /v1/rollback               ``{"batch": N}`` or ``{"after": N}``, optional ``"replay": true``
POST   /v1/generate               ``{"prompt": "...", "max_new_tokens": 20, "model": "edited"|"base"}``
POST   /v1/chat/completions       OpenAI-compatible (``stream`` too): :mod:`lemoe.service.openai_api`
POST   /v1/completions            OpenAI-compatible text completion
GET    /v1/models                 the models one can ask: ``edited`` and ``base``
GET    /metrics                   Prometheus metrics (:mod:`lemoe.service.metrics`)
GET    /console/                  the edit console (static page)
=====  =========================  ====================================================================
"""

from __future__ import annotations

import collections
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import uvicorn
from pydantic import ValidationError

from lemoe.methods.base import EditMethod, RollbackNotSupported
from lemoe.requests import InvalidRequestError
from lemoe.service.errors import ApiError
from lemoe.service.generation import GenerationBatcher, GenerationJob, UneditedModel
from lemoe.service.metrics import ServiceMetrics
from lemoe.service.replicas import ServingReplicas
from lemoe.service.schemas import GenerateIn
from lemoe.store import DuplicateEditError, EditStore, StoreBusyError, StoreError, parse_submission
from lemoe.store.journal import EDIT_STATUSES

log = logging.getLogger("lemoe.service")


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
    max_prompt_chars: int = 2000
    rollback_timeout_s: float = 600.0
    ssl_certfile: str | None = None  # both given: serve HTTPS (uvicorn's TLS)
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or len(self.token) < 8:
            raise ValueError("the service token must be a string of at least 8 characters")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both a certificate file and its key file")


class EditService:
    """The store, the serving replicas and the writer thread. ``start()`` serves; ``stop()`` ends."""

    def __init__(self, store: EditStore, config: ServiceConfig, make_replica: Callable[[], EditMethod]) -> None:
        self.store = store
        self.config = config
        self.replicas = ServingReplicas(make_replica)
        self.unedited = UneditedModel(make_replica)
        self.metrics = ServiceMetrics(store.counts, lambda: self.generator.queue_depth())
        self.generator = GenerationBatcher(
            {"edited": self.replicas, "base": self.unedited},
            config.max_generate_batch,
            observe=self.metrics.generation_seconds.observe,
        )
        self._jobs: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._version = 0
        self.writer_busy = False
        self.writer_error: str | None = None
        self._publish()
        self._writer = threading.Thread(target=self._writer_loop, name="lemoe-writer", daemon=True)
        self._server: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> tuple[str, int]:
        """Serve on ``config.host:config.port`` (port 0: any free port) from a thread; (host, port)."""
        from lemoe.service.app import create_app

        c = self.config
        family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((c.host, c.port))
        server_config = uvicorn.Config(
            create_app(self),
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=c.ssl_certfile,
            ssl_keyfile=c.ssl_keyfile,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(server_config)
        self._writer.start()
        self._http_thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="lemoe-http", daemon=True
        )
        self._http_thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {c.host}:{c.port}")
            time.sleep(0.01)
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def scheme(self) -> str:
        return "https" if self.config.ssl_certfile else "http"

    def stop(self) -> None:
        """Stop accepting requests, let the writer finish its current batch, then return."""
        if self._server is not None and self._http_thread is not None:
            self._server.should_exit = True
            self._http_thread.join()
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
                failed_before = self.store.counts().get("failed", 0)
                try:
                    applied = self.store.apply_pending(max_batches=1)
                finally:
                    self.metrics.edits_failed.inc(self.store.counts().get("failed", 0) - failed_before)
                for batch in applied:
                    self.metrics.edits_applied.inc(len(batch.seqs))
                    self.metrics.batch_seconds.observe(batch.seconds)
                if applied:
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
        self.metrics.edits_accepted.inc(sum(not d.duplicate for d in done))
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

    def check_prompt(self, prompt: Any, code: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(422, code, "prompt must be a non-empty string")
        limit = self.config.max_prompt_chars
        if len(prompt) > limit or "\x00" in prompt or not _encodable(prompt):
            raise ApiError(422, code, f"prompt must be valid text of at most {limit} characters")

    def generation_job(self, payload: Any) -> GenerationJob:
        """A validated ``/v1/generate`` request as a job for the generation batcher."""
        try:
            body = GenerateIn.model_validate(payload)
        except ValidationError as e:
            from lemoe.service.app import _validation_message

            raise ApiError(422, "invalid_generate", _validation_message(e.errors())) from None
        self.check_prompt(body.prompt, "invalid_generate")
        n = body.max_new_tokens if body.max_new_tokens is not None else min(20, self.config.max_new_tokens)
        if not 1 <= n <= self.config.max_new_tokens:
            top = self.config.max_new_tokens
            raise ApiError(422, "invalid_generate", f"max_new_tokens must be an integer in 1..{top}")
        return GenerationJob(body.prompt, n, model=body.model)

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
        row = self.store.edit(seq) if 0 <= seq <= 2**62 else None
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


def wait_until_idle(service: EditService, timeout_s: float = 600.0) -> bool:
    """Block until every accepted edit is applied (for tests and the load benchmark)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = service.store.counts()
        if not counts["accepted"] and not counts["pending"] and not service.writer_busy:
            return True
        time.sleep(0.05)
    return False
