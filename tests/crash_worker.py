"""The worker side of test_store_crash: what runs in each killed (or clean) writer process.

Workers do not fork the test process (which has torch and tokenizer thread pools). They come from a
multiprocessing *fork server*: a fresh single-threaded interpreter that imports this module once --
building the two tiny models and the offline tokenizer here, at import -- and forks one worker per
task from that clean state, copy-on-write, so no worker pays for start-up or model building.

Every task is a module-level function with picklable arguments; its JSON result goes to a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)  # before any torch work: no intra-op pool to inherit, bit-reproducible results
with contextlib.suppress(RuntimeError):
    torch.set_num_interop_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
from lemoe.methods import METHODS  # noqa: E402
from lemoe.store import EditStore  # noqa: E402
from lemoe.testing import tiny_model, tiny_tokenizer  # noqa: E402
from test_store import FT_OPTIONS, make_requests  # noqa: E402

N_EDITS, PER_STEP = 8, 2
ROLLED_BACK = 2  # the batch every driver rolls back once all are applied
NEVER = 10**9


class Models:
    """Two copies of the tiny base model and the tokenizer: one to edit, one pristine reference."""

    def __init__(self) -> None:
        tokenizer = tiny_tokenizer()
        self.edit = (tiny_model("llama"), tokenizer)
        self.pristine = (tiny_model("llama"), tokenizer)


MODELS = Models()  # built once in the fork server; every worker edits its own copy-on-write copy
BUILT_BY = os.getpid()


def run_task(task: str, args: tuple[Any, ...], result: str | None, methods: dict[str, str]) -> None:
    """A worker's entry point: register the test's extra methods, run ``task``, write its result."""
    METHODS.update(methods)
    out = TASKS[task](*args)
    if result is not None:
        Path(result).write_text(json.dumps(out))


def _instrument(kill_at: int, rng: random.Random) -> list[int]:
    """Patch the store's durable steps (this process only) to SIGKILL at the ``kill_at``-th point."""
    import lemoe.fileio as fileio
    import lemoe.store.journal as journal

    count = [0]

    def point() -> None:
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    orig_tx = journal.transaction

    @contextlib.contextmanager
    def transaction(conn: Any):  # type: ignore[no-untyped-def]
        point()
        with orig_tx(conn) as c:
            yield c
            point()  # inside the transaction, before COMMIT
        point()

    journal.transaction = transaction

    orig_atomic = fileio.atomic_path

    @contextlib.contextmanager
    def atomic_path(path: Path):  # type: ignore[no-untyped-def]
        point()
        with orig_atomic(path) as tmp:
            yield tmp
            if count[0] + 1 == kill_at and rng.random() < 0.5 and tmp.exists():  # die with a truncated temp file
                with open(tmp, "r+b") as f:
                    f.truncate(max(0, os.path.getsize(tmp) // 2))
            point()
        point()

    fileio.atomic_path = atomic_path
    orig_replace = os.replace

    def replace(a: Any, b: Any) -> None:
        point()
        orig_replace(a, b)
        point()

    os.replace = replace
    for cls_path in {METHODS[m] for m in ("ft-m", "counting", "lemoe") if m in METHODS}:
        module, _, name = cls_path.partition(":")
        cls = getattr(__import__(module, fromlist=[name]), name)
        if getattr(cls._apply, "_instrumented", False):
            continue
        orig_apply = cls._apply

        def _apply(self: Any, requests: Any, _orig: Any = orig_apply) -> Any:
            point()
            out = _orig(self, requests)
            point()
            return out

        _apply._instrumented = True  # type: ignore[attr-defined]
        cls._apply = _apply
    return count


def init(root: str, method: str) -> None:
    options = {"ft-m": FT_OPTIONS, "lemoe": {"steps": 3}}.get(method, {})
    EditStore.init(
        Path(root), model="tiny-llama", method=method, options=options, edits_per_step=PER_STEP, loaded=MODELS.edit
    ).close()


def drive(root: str, kill_at: int, seed: int) -> dict[str, Any]:
    """The writer: open (recovering), submit what the journal lacks, apply all, roll back batch
    ROLLED_BACK (natively, or by replay for FT-M) unless already done, close."""
    count = _instrument(kill_at, random.Random(seed))
    with EditStore.open(Path(root), loaded=MODELS.edit) as store:
        known = {e.request_id for e in store.edits()}  # a client retrying what was not acknowledged
        todo = [r for r in make_requests(N_EDITS) if r.request_id not in known]
        if todo:
            store.submit(todo)
        store.apply_pending()
        if any(b.batch_id == ROLLED_BACK for b in store.batches("applied")):
            store.rollback([ROLLED_BACK], replay=not store.method.supports_rollback)
    return {"points": count[0]}


def snapshot(root: str, evaluate: bool) -> dict[str, Any]:
    """Reopen (recovering) and describe the state: journal, method state, evaluation numbers."""
    from lemoe.evaluation import Evaluator

    tokenizer = MODELS.edit[1]
    reference = None
    if evaluate:
        reference = Evaluator(*MODELS.pristine, exact_match=True).reference(make_requests(N_EDITS))
    with EditStore.open(Path(root), loaded=MODELS.edit) as store:
        method = store.method
        edits = store.edits()
        out: dict[str, Any] = {
            "edits": [(e.seq, e.request_id, e.status, e.batch_id) for e in edits],
            "live_batches": [b.batch_id for b in store.batches() if b.status == "applied"],
            "rolled_back": [b.batch_id for b in store.batches() if b.status == "rolled_back"],
            "batches_applied": method.batches_applied,
        }
        if method.name != "counting":
            out["state"] = _state(method)
        else:
            out["counts"] = method.counts  # type: ignore[attr-defined]
        if evaluate:
            ev = Evaluator(method.model, tokenizer, exact_match=True)
            out["aggregate"] = ev.evaluate(make_requests(N_EDITS), reference, method.forward_context).aggregate
    return out


def step(root: str, n: int) -> dict[str, Any]:
    """The state after the first ``n`` batches of an uninterrupted run."""
    with EditStore.open(Path(root), loaded=MODELS.edit) as store:
        if n:
            store.submit(make_requests(N_EDITS)[: n * PER_STEP])
            store.apply_pending()
        return {"state": _state(store.method)}


def preloaded() -> None:
    """Exit 0 when this worker inherited the models from the fork server, 3 when it built them."""
    if os.getpid() == BUILT_BY:
        raise SystemExit(3)


def hang(seconds: float) -> None:
    """A worker that does not finish (to test the bounded wait)."""
    import time

    time.sleep(seconds)


def _state(method: Any) -> dict[str, Any]:
    """The method's tensors as JSON: shape and values."""
    return {k: [list(v.shape), v.detach().double().flatten().tolist()] for k, v in method.state_dict().items()}


TASKS: dict[str, Callable[..., Any]] = {
    "init": init,
    "drive": drive,
    "snapshot": snapshot,
    "step": step,
    "preloaded": preloaded,
    "hang": hang,
}
