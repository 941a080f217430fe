"""Crash safety: SIGKILL a writer at random points of a batch and of a checkpoint write, many times.

Each writer is a worker process (``crash_worker``), forked from a multiprocessing fork server -- a
clean single-threaded interpreter that has imported torch and built the tiny models once -- never
from the test process itself with its thread pools. Workers are single-threaded so results are
bit-reproducible, and every wait for one is bounded: a worker still running after
``WORKER_TIMEOUT`` seconds is killed and the test fails saying which task hung. Inside the worker
the store's durable steps are instrumented -- every journal transaction, the method's ``_apply``,
each atomic file write (including a kill after a *truncated* temp file), every ``os.replace`` --
and the worker SIGKILLs itself at the K-th such point, K random. After each kill the store is
reopened (which recovers), and:

- every accepted edit is applied exactly once (counted by a test method that records applications),
- the FT-M / LEMoE state equals an uninterrupted run's state for the same live batches,
- the final evaluation numbers equal an uninterrupted run's numbers.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lemoe.methods import METHODS
from lemoe.store import verify_store

sys.path.insert(0, str(Path(__file__).parent))
from test_store import make_requests

N_EDITS, PER_STEP = 8, 2  # as in crash_worker
ROLLED_BACK = 2
NEVER = 10**9
# One worker task (open a store, apply or evaluate 8 edits on a tiny model) takes about a second on
# two busy cores; a worker that runs 60 times longer is stuck (a deadlock), not slow.
WORKER_TIMEOUT = 60.0
# The fork server's one-off start: a fresh interpreter imports torch and lemoe and builds the models.
SERVER_START_TIMEOUT = 240.0

pytestmark = pytest.mark.skipif(
    "forkserver" not in multiprocessing.get_all_start_methods(), reason="needs the forkserver start method"
)


@pytest.fixture(scope="module")
def workers() -> Any:
    """The fork-server context, its server started (and the worker module built) before any test.

    Starting the first worker waits for the server to import torch and build the models; that wait
    is bounded too (a thread does it), and a server that does not come up is killed."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["crash_worker", "test_store_crash"])
    answers: list[Any] = []
    with pytest.MonkeyPatch.context() as mp:  # the server finds this folder's modules (Python 3.11
        here = str(Path(__file__).parent)  # ignores the sys.path multiprocessing hands it)
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
        first = threading.Thread(target=lambda: answers.append(Workers(ctx, {})("preloaded")), daemon=True)
        first.start()
        first.join(SERVER_START_TIMEOUT)
    if first.is_alive():
        server = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
        if server:
            os.kill(server, signal.SIGKILL)
        pytest.fail(f"the fork server did not start a worker within {SERVER_START_TIMEOUT:.0f} s; killed it")
    # Exit code 0: the models were built in the server, not in the worker (which would then pay for
    # building them in each of the ~160 workers the tests start).
    assert answers == [0], f"the fork server did not preload crash_worker (first worker: {answers})"
    return ctx


class Workers:
    """Run one ``crash_worker`` task in a fresh worker and wait for it, for at most ``timeout`` s."""

    def __init__(self, ctx: Any, methods: dict[str, str]) -> None:
        self.ctx = ctx
        self.methods = methods

    def __call__(self, task: str, *args: Any, result: Path | None = None, timeout: float = WORKER_TIMEOUT) -> int:
        """Return the worker's exit code (negative: killed by that signal); fail the test if it hangs."""
        proc = self.ctx.Process(target=_task, args=(task, args, None if result is None else str(result), self.methods))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:  # still running: kill it, reap it (bounded too), fail
            proc.kill()
            proc.join(10)
            pytest.fail(f"crash worker task {task}{args} still running after {timeout:.0f} s; killed it")
        return proc.exitcode


def _task(task: str, args: tuple[Any, ...], result: str | None, methods: dict[str, str]) -> None:
    """In the worker: the task (imported here, so the test process never builds the worker's models)."""
    import crash_worker

    crash_worker.run_task(task, args, result, methods)


def _assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0], k
        # 1e-5: a replayed batch reproduces its update up to float32 reduction order across processes
        # (seen: one entry of 8,192 off by 1.2e-6 after Adam steps); a lost or doubled batch is ~1e-2.
        torch.testing.assert_close(torch.tensor(got[k][1]), torch.tensor(want[k][1]), rtol=0, atol=1e-5, msg=k)


def _crash_loop(tmp_path: Path, run: Workers, method: str, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    # The uninterrupted run, with the state after every batch (the driver is split batch by batch).
    ref_root = tmp_path / "reference"
    assert run("init", str(ref_root), method) == 0
    counted = tmp_path / "points.json"
    assert run("drive", str(ref_root), NEVER, 0, result=counted) == 0
    total_points = json.loads(counted.read_text())["points"]
    final_file = tmp_path / "final.json"
    tensors = method != "counting"  # methods whose state (and evaluation) is compared with the reference
    assert run("snapshot", str(ref_root), tensors, result=final_file) == 0
    final = json.loads(final_file.read_text())
    n_batches = N_EDITS // PER_STEP
    assert final["live_batches"] == [b for b in range(1, n_batches + 1) if b != ROLLED_BACK]
    assert final["rolled_back"] == [ROLLED_BACK]
    # Every state a reopened store may be in, keyed by its live batches: 1..n applied, or the final one.
    per_batch: dict[tuple[int, ...], dict[str, Any]] = {}
    if tensors:
        per_batch[tuple(final["live_batches"])] = final["state"]
        root = tmp_path / "steps"
        assert run("init", str(root), method) == 0
        for n in range(n_batches + 1):
            assert run("step", str(root), n, result=counted) == 0
            per_batch[tuple(range(1, n + 1))] = json.loads(counted.read_text())["state"]

    kills = 0
    for r in range(rounds):
        root = tmp_path / f"run{r}"
        assert run("init", str(root), method) == 0
        # One to three kills in a row (later ones may hit the recovery itself), then a clean finish.
        for attempt in range(rng.randint(1, 3)):
            # First anywhere in a whole run; then early in the next run (recovery, replay, the rest).
            kill_at = rng.randint(1, total_points if attempt == 0 else max(1, total_points // 2))
            drive_seed = rng.randint(0, 10**6)
            code = run("drive", str(root), kill_at, drive_seed)
            assert code in (0, -signal.SIGKILL), f"writer exited with {code}"
            kills += code == -signal.SIGKILL
            snap_file = tmp_path / "snap.json"
            assert run("snapshot", str(root), False, result=snap_file) == 0
            snap = json.loads(snap_file.read_text())
            live = [e for e in snap["edits"] if e[2] in ("applied", "pending")]
            # Reopening applied every pending batch; only the rolled-back batch's edits are not applied.
            assert all(e[2] in ("applied", "rolled_back") for e in snap["edits"] if e[3] is not None)
            assert snap["rolled_back"] in ([], [ROLLED_BACK])
            reachable = [list(range(1, n + 1)) for n in range(n_batches + 1)] + [final["live_batches"]]
            assert snap["live_batches"] in reachable
            assert [e[1] for e in snap["edits"]] == [q.request_id for q in make_requests(N_EDITS)][: len(snap["edits"])]
            if tensors:
                _assert_same_state(snap["state"], per_batch[tuple(snap["live_batches"])])
            else:
                assert snap["counts"] == {e[1]: 1 for e in live}  # every accepted+batched edit exactly once
        assert run("drive", str(root), NEVER, 0) == 0
        done_file = tmp_path / "done.json"
        assert run("snapshot", str(root), tensors, result=done_file) == 0
        done = json.loads(done_file.read_text())
        assert done["edits"] == final["edits"]
        assert done["batches_applied"] == final["batches_applied"]
        if tensors:
            assert done["aggregate"] == final["aggregate"]
            _assert_same_state(done["state"], final["state"])
        else:
            assert done["counts"] == final["counts"]
        assert verify_store(root).ok, verify_store(root).format()
    assert kills >= rounds  # the kills really happened
    print(f"{method}: {rounds} rounds, {kills} SIGKILLs, {total_points} kill points in an uninterrupted run")


def test_a_hung_worker_is_killed_and_fails_the_test_quickly(workers: Any) -> None:
    run = Workers(workers, {})
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="still running after 2 s; killed it"):
        run("hang", 3600.0, timeout=2.0)
    assert time.monotonic() - started < 30


def test_sigkill_anywhere_counting_method_applies_every_edit_exactly_once(tmp_path: Path, workers: Any) -> None:
    _crash_loop(tmp_path, Workers(workers, {"counting": "test_store:CountingMethod"}), "counting", rounds=12, seed=1)


def test_sigkill_anywhere_ft_m_matches_an_uninterrupted_run(tmp_path: Path, workers: Any) -> None:
    _crash_loop(tmp_path, Workers(workers, {}), "ft-m", rounds=6, seed=2)


@pytest.mark.skipif("lemoe" not in METHODS, reason="LEMoE is not registered")
def test_sigkill_anywhere_lemoe_matches_an_uninterrupted_run(tmp_path: Path, workers: Any) -> None:
    _crash_loop(tmp_path, Workers(workers, {}), "lemoe", rounds=3, seed=3)
