"""Bounded loopback load test of ``lemoe serve``: concurrent generate and edit clients for a fixed time.

It creates a fresh store, starts ``lemoe serve`` on 127.0.0.1 (a free port, a random token), runs
generate clients (closed loop: one request after another) and edit clients (submit one edit, then
poll its status until applied, then the next) for ``--duration`` seconds, waits (bounded) until
every accepted edit is applied, stops the server with SIGTERM, and checks that no edit was lost or
duplicated (journal vs. what the clients were acknowledged) and that ``verify`` passes.

    nice -n 5 .venv/bin/python benchmarks/store_loadtest.py --duration 60 --out docs/results/raw/store_loadtest.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class Client:
    """One keep-alive connection; reconnects if the server closed it."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, verb: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        for attempt in (0, 1):
            try:
                self.conn.request(verb, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50_ms": q[49] * 1000, "p90_ms": q[89] * 1000, "p99_ms": q[98] * 1000, "max_ms": max(values) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default=None, help="default: lemoe when registered, else ft-m")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", default="zsre:../shared/data/zsre/zsre_dev.json")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--generate-clients", type=int, default=4)
    ap.add_argument("--edit-clients", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="max seconds to wait for the queue after")
    ap.add_argument("--workdir", default=None, help="where the store goes (default: a temp dir)")
    ap.add_argument("--out", default=None, help="summary JSON")
    args = ap.parse_args()

    from lemoe.data import load_spec
    from lemoe.store import default_method, verify_store

    method = args.method or default_method()
    requests, _ = load_spec(args.data)
    random.Random(0).shuffle(requests)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lemoe-load-"))
    store = work / "store"
    lemoe = [sys.executable, "-m", "lemoe.cli"]
    init = [*lemoe, "store", "init", str(store), "--model", args.model, "--method", method]
    for o in args.opt:
        init += ["--opt", o]
    subprocess.run(init, check=True)

    token = secrets.token_urlsafe(24)
    env = {**os.environ, "LEMOE_SERVE_TOKEN": token, "TOKENIZERS_PARALLELISM": "false"}
    serve = [*lemoe, "serve", str(store), "--host", "127.0.0.1", "--port", "0"]
    log = open(work / "serve.log", "w")  # noqa: SIM115 (kept open for the server's lifetime)
    server = subprocess.Popen(
        [*serve, "--max-new-tokens", str(args.max_new_tokens)], stdout=subprocess.PIPE, stderr=log, text=True, env=env
    )
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        if "serving" not in line:
            raise SystemExit(f"server did not start: {line!r}")
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        result = run_load(port, token, requests, args, method)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    report = verify_store(store)
    result["verify_ok"] = report.ok
    result["verify_problems"] = report.problems
    result["command"] = " ".join(["python", "benchmarks/store_loadtest.py", *sys.argv[1:]])
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    ok = report.ok and not result["lost_edits"] and not result["duplicated_edits"] and not result["server_errors"]
    return 0 if ok else 1


def run_load(port: int, token: str, requests: list[Any], args: argparse.Namespace, method: str) -> dict[str, Any]:
    stop_at = time.monotonic() + args.duration
    lock = threading.Lock()
    lat: dict[str, list[float]] = {"generate": [], "submit": [], "status": [], "edit_applied": []}
    statuses: dict[str, int] = {}
    acknowledged: list[tuple[int, str]] = []  # (seq, request_id) the server acknowledged
    queue = list(requests)

    def record(kind: str, seconds: float, status: int) -> None:
        with lock:
            lat[kind].append(seconds)
            statuses[f"{kind}:{status}"] = statuses.get(f"{kind}:{status}", 0) + 1

    def generator(i: int) -> None:
        client, rng = Client(port, token), random.Random(i)
        while time.monotonic() < stop_at:
            prompt = rng.choice(requests).prompt
            t = time.perf_counter()
            status, _ = client.call("POST", "/v1/generate", {"prompt": prompt, "max_new_tokens": args.max_new_tokens})
            record("generate", time.perf_counter() - t, status)

    def editor(i: int) -> None:
        client = Client(port, token)
        while time.monotonic() < stop_at:
            with lock:
                if not queue:
                    return
                req = queue.pop(0)
            t0 = time.perf_counter()
            status, body = client.call("POST", "/v1/edits", req.to_dict())
            record("submit", time.perf_counter() - t0, status)
            if status != 202:
                continue
            seq = body["edits"][0]["seq"]
            with lock:
                acknowledged.append((seq, req.request_id))
            while True:  # follow the edit until applied (not bounded by stop_at: no edit is left behind)
                t = time.perf_counter()
                status, edit = client.call("GET", f"/v1/edits/{seq}")
                record("status", time.perf_counter() - t, status)
                if status == 200 and edit["status"] in ("applied", "failed"):
                    break
                time.sleep(0.2)
            record("edit_applied", time.perf_counter() - t0, 200)

    threads = [threading.Thread(target=generator, args=(i,)) for i in range(args.generate_clients)]
    threads += [threading.Thread(target=editor, args=(i,)) for i in range(args.edit_clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.duration + args.drain_timeout)
    elapsed = time.monotonic() - start

    # No lost or duplicated edit: the journal holds each acknowledged request exactly once, applied.
    client = Client(port, token)
    journal: list[dict[str, Any]] = []
    after = 0
    while True:
        status, page = client.call("GET", f"/v1/edits?after={after}&limit=1000")
        if status != 200 or not page["edits"]:
            break
        journal += page["edits"]
        after = page["edits"][-1]["seq"]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for e in journal:
        by_id.setdefault(e["request_id"], []).append(e)
    lost = [rid for _, rid in acknowledged if rid not in by_id or by_id[rid][0]["status"] != "applied"]
    duplicated = [rid for rid, rows in by_id.items() if len(rows) > 1]
    unexpected = sorted(set(by_id) - {rid for _, rid in acknowledged})
    _, info = client.call("GET", "/v1/store")
    server_errors = sum(n for k, n in statuses.items() if int(k.split(":")[1]) >= 500)
    summary = {
        kind: {"requests": len(v), "per_second": len(v) / args.duration, **percentiles(v)} for kind, v in lat.items()
    }
    return {
        "model": args.model,
        "method": method,
        "duration_s": args.duration,
        "wall_s_including_drain": elapsed,
        "clients": {"generate": args.generate_clients, "edit": args.edit_clients},
        "max_new_tokens": args.max_new_tokens,
        "latency": summary,
        "total_requests_per_second": sum(len(lat[k]) for k in ("generate", "submit", "status")) / args.duration,
        "status_counts": statuses,
        "edits_acknowledged": len(acknowledged),
        "edits_in_journal": len(journal),
        "lost_edits": lost,
        "duplicated_edits": duplicated,
        "unexpected_edits": unexpected,
        "server_errors": server_errors,
        "store_info": info,
        "machine": "shared 2-core CPU (other jobs running), loopback 127.0.0.1",
    }


if __name__ == "__main__":
    sys.exit(main())
