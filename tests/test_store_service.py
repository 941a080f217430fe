"""The editing service over HTTP on loopback, and property-based fuzzing of the validator and the API.

Fuzz properties: whatever a client sends (malformed JSON, wrong types, huge or empty strings,
unicode incl. lone surrogates and NUL, missing subject in prompt, odd verbs and paths), the answer is
never a 5xx, and a non-2xx answer never changes the store.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lemoe.methods import build_method
from lemoe.requests import InvalidRequestError
from lemoe.service import EditService, ServiceConfig, wait_until_idle
from lemoe.store import EditStore, parse_submission
from lemoe.testing import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_store import make_requests

TOKEN = "test-token-123456"


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(
        self,
        verb: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            hdrs = {"Content-Type": "application/json"}
            if token is not None:
                hdrs["Authorization"] = f"Bearer {token}"
            hdrs.update(headers or {})
            conn.request(verb, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, json.loads(payload) if payload else None
        finally:
            conn.close()


def raw_exchange(port: int, request: bytes) -> tuple[int, Any]:
    """Send raw bytes (what http.client will not send: no Content-Length, chunked); the server answers
    these with ``Connection: close``, so read to EOF."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def journal_state(root: Path) -> list[Any]:
    conn = sqlite3.connect(root / "journal.sqlite")
    try:
        return [conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("edits", "batches", "checkpoints")]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tokenizer: object) -> Iterator[tuple[EditService, Client]]:
    root = tmp_path_factory.mktemp("service") / "store"
    options = {"steps": 1, "lr": 1e-2}
    store = EditStore.init(
        root,
        model="tiny-llama",
        method="ft-m",
        options=options,
        edits_per_step=2,
        loaded=(tiny_model("llama"), tokenizer),
    )
    svc = EditService(
        store,
        ServiceConfig(token=TOKEN, port=0, max_body_bytes=64 * 1024, max_new_tokens=8),
        lambda: build_method("ft-m", tiny_model("llama"), tokenizer, options),
    )
    _, port = svc.start()
    yield svc, Client(port)
    svc.stop()
    store.close()


def test_auth_health_and_not_found(service: tuple[EditService, Client]) -> None:
    _, client = service
    assert client.call("GET", "/v1/health", token=None) == (200, {"status": "ok"})
    status, body = client.call("GET", "/v1/store", token=None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert client.call("GET", "/v1/store", token="wrong-token-xxxx")[0] == 401
    status, body = client.call("GET", "/v1/store")
    assert status == 200 and body["method"] == "ft-m"
    assert client.call("GET", "/v1/nothing")[0] == 404
    assert client.call("DELETE", "/v1/edits")[0] == 405
    assert client.call("BREW", "/v1/edits")[0] == 405


def test_submit_follow_list_generate_and_rollback(service: tuple[EditService, Client]) -> None:
    svc, client = service
    requests = [r.to_dict() for r in make_requests(3, prefix="Svc ")]
    status, body = client.call("POST", "/v1/edits", {"requests": requests})
    assert status == 202 and [e["duplicate"] for e in body["edits"]] == [False] * 3
    seqs = [e["seq"] for e in body["edits"]]
    assert wait_until_idle(svc, 120)
    status, edit = client.call("GET", f"/v1/edits/{seqs[0]}")
    assert status == 200 and edit["status"] == "applied" and edit["request"]["prompt"] == requests[0]["prompt"]
    status, again = client.call("POST", "/v1/edits", requests[0])  # idempotent resubmission
    assert status == 202 and again["edits"][0] == {"seq": seqs[0], "request_id": edit["request_id"], "duplicate": True}
    status, listed = client.call("GET", f"/v1/edits?after={seqs[0] - 1}&limit=2")
    assert status == 200 and [e["seq"] for e in listed["edits"]] == seqs[:2]

    # Generation uses the published edited state: equal to greedy decoding on the writer's model.
    status, gen = client.call("POST", "/v1/generate", {"prompt": requests[0]["prompt"], "max_new_tokens": 4})
    assert status == 200 and gen["state_version"] >= 2
    from lemoe.evaluation.scorers import greedy_generate

    method = svc.store.method
    ids = method.tokenizer(requests[0]["prompt"])["input_ids"]
    expected = method.tokenizer.decode(
        greedy_generate(method.model, method.tokenizer, [ids], [4])[0], skip_special_tokens=True
    )
    assert gen["text"] == expected

    batch = edit["batch"]
    status, err = client.call("POST", "/v1/rollback", {"batch": batch})
    assert status == 409 and err["error"]["code"] == "rollback_not_supported"
    status, done = client.call("POST", "/v1/rollback", {"batch": batch, "replay": True})
    assert status == 200 and done == {"rolled_back": [batch]}
    assert client.call("GET", f"/v1/edits/{seqs[0]}")[1]["status"] == "rolled_back"
    assert client.call("POST", "/v1/rollback", {"batch": 10**6})[0] == 409


def test_clear_4xx_for_bad_requests_and_limits(service: tuple[EditService, Client]) -> None:
    svc, client = service
    before = journal_state(svc.store.root)
    good = make_requests(1, prefix="Limit ")[0].to_dict()
    cases = [
        (client.call("POST", "/v1/edits", raw=b"x" * (64 * 1024 + 1)), 413, "too_large"),
        (client.call("POST", "/v1/edits", raw=b"{not json"), 400, "bad_json"),
        (client.call("POST", "/v1/edits", raw=b"\xff\xfe"), 400, "bad_encoding"),
        (client.call("POST", "/v1/edits", raw=b"[" * 20000), 400, "bad_json"),
        (client.call("POST", "/v1/edits", good, headers={"Content-Type": "text/plain"}), 415, None),
        (client.call("POST", "/v1/edits", {**good, "subject": "Nobody"}), 422, "invalid_request"),
        (client.call("POST", "/v1/edits", {**good, "prompt": ""}), 422, "invalid_request"),
        (client.call("POST", "/v1/edits", {**good, "target_new": 7}), 422, "invalid_request"),
        (client.call("POST", "/v1/edits", {**good, "surprise": 1}), 422, "invalid_request"),
        (client.call("POST", "/v1/edits", {"requests": []}), 422, "invalid_request"),
        (client.call("POST", "/v1/edits", {"requests": [good] * 65}), 422, "invalid_request"),
        (client.call("POST", "/v1/edits", {**good, "prompt": good["prompt"] + "\ud800"}), 422, "invalid_request"),
        (client.call("POST", "/v1/edits"), 400, "missing_body"),
        (client.call("POST", "/v1/generate", {"prompt": "Hi", "max_new_tokens": 9}), 422, "invalid_generate"),
        (client.call("POST", "/v1/generate", {"prompt": "Hi", "max_new_tokens": True}), 422, "invalid_generate"),
        (client.call("GET", "/v1/edits?limit=0"), 400, "bad_query"),
        (client.call("GET", "/v1/edits?status=gone"), 400, "bad_query"),
        (client.call("POST", "/v1/rollback", {"batch": -1}), 422, "invalid_rollback"),
        (client.call("GET", "/v1/edits/999999"), 404, "not_found"),
    ]
    clash = {**good, "request_id": "fixed-id", "target_new": "Porto"}
    assert client.call("POST", "/v1/edits", {**good, "request_id": "fixed-id"})[0] == 202
    assert wait_until_idle(svc, 120)
    before = journal_state(svc.store.root)
    cases.append((client.call("POST", "/v1/edits", clash), 409, "duplicate_request_id"))
    cases.append(
        (
            raw_exchange(
                client.port,
                b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: application/json\r\n\r\n0\r\n\r\n",
            ),
            411,
            "length_required",
        )
    )
    cases.append((raw_exchange(client.port, b"POST /v1/edits HTTP/1.1\r\nHost: x\r\n\r\n"), 411, "length_required"))
    for (status, body), want, code in cases:
        assert status == want, body
        assert "message" in body["error"]
        if code:
            assert body["error"]["code"] == code
    assert journal_state(svc.store.root) == before


def test_reads_are_served_while_a_batch_is_applied(service: tuple[EditService, Client]) -> None:
    svc, client = service
    assert wait_until_idle(svc, 120)
    entered, release = threading.Event(), threading.Event()
    method = svc.store.method
    original = type(method)._apply

    def slow_apply(requests: Any) -> Any:
        entered.set()
        assert release.wait(60)
        return original(method, requests)

    method._apply = slow_apply  # type: ignore[method-assign]
    try:
        status, _ = client.call("POST", "/v1/edits", make_requests(1, prefix="Blocked ")[0].to_dict())
        assert status == 202 and entered.wait(60)
        # The writer is inside the batch: reads and generation still answer.
        assert client.call("GET", "/v1/store")[1]["writer_busy"] is True
        assert client.call("GET", "/v1/edits?status=pending")[1]["edits"]
        assert client.call("POST", "/v1/generate", {"prompt": "The capital of France is"})[0] == 200
    finally:
        release.set()
        assert wait_until_idle(svc, 120)
        del method._apply
    assert client.call("GET", "/v1/edits?status=pending")[1]["edits"] == []


# -- property-based fuzzing --------------------------------------------------------------------------

FIELDS = ["prompt", "target_new", "subject", "target_true", "paraphrases", "locality", "portability", "request_id"]
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\ud800", "é✓😀", "\u202e", "a" * 5000, "Paris"]),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), odd_text)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12
)
near_request = st.fixed_dictionaries(
    {"prompt": st.one_of(odd_text, json_value), "target_new": st.one_of(odd_text, json_value)},
    optional={name: st.one_of(odd_text, json_value) for name in FIELDS[2:]} | {"extra": json_value},
)
payloads = st.one_of(
    json_value,
    near_request,
    st.lists(near_request, max_size=3),
    st.fixed_dictionaries({"requests": st.one_of(st.lists(near_request, max_size=3), json_value)}),
)


@settings(max_examples=300, deadline=None)
@given(payloads)
def test_fuzz_validator_raises_only_invalid_request(payload: Any) -> None:
    try:
        requests = parse_submission(payload)
    except InvalidRequestError as e:
        assert str(e)
        return
    for r in requests:  # accepted: every field is sane text and the subject is in the prompt
        assert r.prompt.strip() and r.target_new.strip()
        assert r.subject is None or r.subject in r.prompt
        r.prompt.encode("utf-8")


routes = st.sampled_from(
    ["/v1/edits"] * 4
    + [
        "/v1/generate",
        "/v1/rollback",
        "/v1/edits/1",
        "/v1/store",
        "/v1/batches",
        "/v1/edits?limit=abc",
        "/v1/x",
        "/../etc",
        "/v1/edits?status=%00",
    ]
)
bodies = st.one_of(
    payloads.map(lambda p: json.dumps(p).encode()),
    st.binary(max_size=200),
    st.fixed_dictionaries({"prompt": odd_text, "max_new_tokens": json_leaf}).map(lambda p: json.dumps(p).encode()),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    verb=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "PATCH"]),
    path=routes,
    body=bodies,
    ctype=st.sampled_from(["application/json"] * 4 + ["text/plain", ""]),
    token=st.sampled_from([TOKEN] * 4 + [None, "bad"]),
)
def test_fuzz_http_never_5xx_never_changes_the_store_on_error(
    service: tuple[EditService, Client], verb: str, path: str, body: bytes, ctype: str, token: str | None
) -> None:
    svc, client = service
    assert wait_until_idle(svc, 120)
    before = journal_state(svc.store.root)
    status, answer = client.call(verb, path, raw=body, token=token, headers={"Content-Type": ctype})
    event(f"HTTP {status}")  # `pytest --hypothesis-show-statistics` shows the mix of answers
    assert status < 500, answer
    if status >= 300:
        assert answer["error"]["message"]
        assert journal_state(svc.store.root) == before


def test_lemoe_serve_starts_with_a_private_token_and_stops_on_sigterm(tmp_path: Path, tokenizer: object) -> None:
    import os
    import select
    import signal
    import stat
    import subprocess

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    root = tmp_path / "store"
    EditStore.init(root, model=str(model_dir), method="ft-m", options={"steps": 1}).close()
    env = {k: v for k, v in os.environ.items() if k != "LEMOE_SERVE_TOKEN"} | {"TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lemoe.cli", "serve", str(root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:  # every wait bounded: the first line, then the exit after SIGTERM (killed if it overstays)
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "lemoe serve printed nothing within 120 s"
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "serving" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        token_file = root / "serve.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        client = Client(port)
        assert client.call("GET", "/v1/store")[0] == 401
        status, info = client.call("GET", "/v1/store", token=token_file.read_text().strip())
        assert status == 200 and info["method"] == "ft-m"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise
    assert code == 0
    assert "stopped" in proc.stdout.read()  # type: ignore[union-attr]


def test_a_failing_batch_is_marked_failed_and_the_service_keeps_going(service: tuple[EditService, Client]) -> None:
    svc, client = service
    assert wait_until_idle(svc, 120)
    method = svc.store.method
    state = {k: v.clone() for k, v in method.state_dict().items()}

    def broken(requests: Any) -> Any:
        with torch.no_grad():
            method.module.weight.add_(1.0)  # type: ignore[attr-defined]  # half-done edit, then fail
        raise RuntimeError("simulated failure inside the method")

    method._apply = broken  # type: ignore[method-assign]
    try:
        status, body = client.call("POST", "/v1/edits", make_requests(1, prefix="Doomed ")[0].to_dict())
        assert status == 202
        assert wait_until_idle(svc, 120)
    finally:
        del method._apply
    seq = body["edits"][0]["seq"]
    assert client.call("GET", f"/v1/edits/{seq}")[1]["status"] == "failed"
    assert "simulated failure" in client.call("GET", "/v1/store")[1]["writer_error"]
    after = method.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # the half-done edit is gone: rebuilt
    # A failed request may be submitted again; it is then applied normally.
    status, again = client.call("POST", "/v1/edits", make_requests(1, prefix="Doomed ")[0].to_dict())
    assert status == 202 and again["edits"][0]["seq"] != seq and not again["edits"][0]["duplicate"]
    assert wait_until_idle(svc, 120)
    assert client.call("GET", f"/v1/edits/{again['edits'][0]['seq']}")[1]["status"] == "applied"
