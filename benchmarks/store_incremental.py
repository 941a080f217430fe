"""Lifelong persistence cost: bytes written and seconds per batch as the number of batches grows.

Three parts, each optional:

``growing``: a store on a tiny random Llama (``lemoe.testing.tiny_model``, offline tokenizer) with
a cheap test method whose state grows by one ``--row-kb`` row per edit (like LEMoE's one frozen
expert per batch, without the training): every batch is really applied, checkpointed (every
batch, three kept) and published to two serving replicas, up to ``--batches`` (5,000). For the
windows ending at 10, 100, 1,000 and 5,000 batches it reports the mean bytes and objects each
checkpoint wrote, the seconds of the checkpoint (write + journal record + prune), of the publish,
and of the whole ``apply_pending`` call, and, for comparison, what a full-state checkpoint (the
previous layout: ``save_pretrained`` of the entire state) takes at that point, measured once per
window.

``lemoe``: the same with LEMoE itself (``steps=1``: one short training step per batch, one real
frozen expert per batch) up to ``--lemoe-batches``.

``serve``: resident memory of the writer plus two serving replicas on SmolLM2-135M with LEMoE,
replicas built by ``serve``'s factory (one shared base copy) vs. separate base copies.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/store_incremental.py \
        --out docs/results/raw/store_incremental.json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lemoe.methods import METHODS
from lemoe.methods.base import EditMethod, MethodConfig, StateError
from lemoe.requests import EditRequest

WINDOWS = (10, 100, 1000, 5000)


@dataclass
class GrowingConfig(MethodConfig):
    row_floats: int = 4096  # one row per edit (16 KB of float32)


class GrowingMethod(EditMethod):
    """State that grows by one row per edit, append-only (declared), copy-on-write, no training."""

    name = "growing-bench"
    config_class = GrowingConfig
    supports_rollback = False
    state_copy_on_write = True
    edits_base_weights = False

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: GrowingConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        self.epoch = 0
        self.reset()

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        n = self.config.row_floats  # type: ignore[attr-defined]
        rows = []
        for r in requests:
            seed = int(hashlib.sha256(r.request_id.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(n, generator=torch.Generator().manual_seed(seed)))
        self.rows = torch.cat([self.rows, torch.stack(rows)])  # what LEMoE's ExpertBank.append does
        self.ids = [*self.ids, *(r.request_id for r in requests)]
        return {}

    def reset(self) -> None:
        self.epoch += 1
        self.rows = torch.zeros(0, self.config.row_floats)  # type: ignore[attr-defined]
        self.ids: list[str] = []
        self.batches_applied = 0

    def append_only_state(self) -> dict[str, int]:
        return {"rows": self.epoch, "ids": self.epoch}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, "scale": torch.ones(4)}

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "ids": list(self.ids)}

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if state["rows"].shape[0] != len(meta["ids"]):
            raise StateError("rows and ids differ")
        self.epoch += 1
        self.rows, self.ids = state["rows"], list(meta["ids"])
        self.batches_applied = int(meta["batches_applied"])


def _tokenizer() -> object:
    from lemoe.testing import tiny_tokenizer

    return tiny_tokenizer()


def _request(i: int) -> EditRequest:
    return EditRequest(
        prompt=f"Person {i} was born in the city of",
        target_new=f"Town{i % 97}",
        subject=f"Person {i}",
        request_id=f"edit-{i}",
    )


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_stream(method: str, options: dict[str, Any], batches: int, windows: tuple[int, ...]) -> dict[str, Any]:
    from lemoe.service.replicas import ServingReplicas, replica_factory
    from lemoe.store import EditStore, verify_store
    from lemoe.testing import tiny_model

    tok = _tokenizer()
    work = Path(tempfile.mkdtemp(prefix="store-incr-"))
    root = work / "store"
    store = EditStore.init(root, model="tiny-llama", method=method, options=options, loaded=(tiny_model("llama"), tok))
    replicas = ServingReplicas(replica_factory(store))
    timings: list[float] = []
    orig_checkpoint = store.checkpoint

    def timed_checkpoint() -> Any:
        start = time.perf_counter()
        row = orig_checkpoint()
        timings.append(time.perf_counter() - start)
        return row

    store.checkpoint = timed_checkpoint  # type: ignore[method-assign]
    per_batch: list[dict[str, Any]] = []
    out: dict[str, Any] = {"method": method, "options": options, "batches": batches, "windows": {}}
    started = time.perf_counter()
    ends = [w for w in windows if w <= batches]
    for i in range(1, batches + 1):
        store.submit([_request(i)])
        t0 = time.perf_counter()
        applied = store.apply_pending()
        t1 = time.perf_counter()
        replicas.publish(store.method.state_dict(), store.method.state_meta(), i)
        t2 = time.perf_counter()
        written = store.last_checkpoint
        assert written is not None and len(applied) == 1
        per_batch.append(
            {
                "bytes": written.bytes_written,
                "objects": written.objects_written,
                "checkpoint_s": timings[-1],
                "method_s": applied[0].seconds,
                "apply_pending_s": t1 - t0,
                "publish_s": t2 - t1,
                "publish_copied_bytes": replicas.last_publish["copied_bytes"],
            }
        )
        if i in ends:
            window = per_batch[i - min(10, i) : i]
            mean = {k: sum(b[k] for b in window) / len(window) for k in window[0]}
            state = store.method.state_dict()
            state_bytes = sum(t.numel() * t.element_size() for t in state.values())
            full = work / f"full-{i}"
            t3 = time.perf_counter()
            store.method.save_pretrained(full)  # what the previous layout wrote every checkpoint
            full_s = time.perf_counter() - t3
            full_bytes = _dir_bytes(full)
            shutil.rmtree(full)
            entry = {
                "batches_in_window": f"{i - len(window) + 1}-{i}",
                **{f"mean_{k}": v for k, v in mean.items()},
                "max_bytes": max(b["bytes"] for b in window),
                "state_bytes": state_bytes,
                "full_checkpoint_bytes": full_bytes,
                "full_checkpoint_s": full_s,
                "store_bytes_on_disk": _dir_bytes(root),
                "objects_on_disk": len(list((root / "objects").iterdir())),
                "elapsed_s": time.perf_counter() - started,
            }
            out["windows"][str(i)] = entry
            print(json.dumps({"method": method, "batch": i, **entry}), flush=True)
    store.close()
    t4 = time.perf_counter()
    report = verify_store(root)
    out["verify_ok"], out["verify_s"] = report.ok, time.perf_counter() - t4
    t5 = time.perf_counter()
    with EditStore.open(root, loaded=(tiny_model("llama"), tok)) as again:
        out["reopen_s"] = time.perf_counter() - t5
        out["reopen_state_equal"] = _same(again.method, replicas)
    out["all_per_batch_bytes"] = [b["bytes"] for b in per_batch]
    shutil.rmtree(work, ignore_errors=True)
    return out


def _same(method: EditMethod, replicas: Any) -> bool:
    """The reopened store's state equals what the (incrementally published) active replica holds."""
    active = replicas._replicas[replicas._active].method
    a, b = method.state_dict(), active.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_memory(share: bool, model: str) -> dict[str, Any]:
    """Writer + two replicas as ``serve`` builds them (run in a fresh process per mode)."""
    from lemoe.service.replicas import ServingReplicas, replica_factory
    from lemoe.store import EditStore

    work = Path(tempfile.mkdtemp(prefix="store-rss-"))
    before = rss_mb()
    store = EditStore.init(work / "store", model=model, method="lemoe")
    gc.collect()
    writer = rss_mb()
    replicas = ServingReplicas(replica_factory(store, share_base=share))
    replicas.publish(store.method.state_dict(), store.method.state_meta(), 1)
    gc.collect()
    after = rss_mb()
    texts, _ = replicas.generate(["The capital of France is"], [4])
    params = {p.data_ptr() for r in replicas._replicas for p in r.method.model.parameters()}
    shared = params <= {p.data_ptr() for p in store.method.model.parameters()}
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "share_base": share,
        "model": model,
        "rss_mb_start": before,
        "rss_mb_writer": writer,
        "rss_mb_writer_and_2_replicas": after,
        "replicas_add_mb": after - writer,
        "replica_params_are_writer_params": shared,
        "generated": texts[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="growing,lemoe,serve")
    ap.add_argument("--batches", type=int, default=5000)
    ap.add_argument("--row-kb", type=int, default=16)
    ap.add_argument("--lemoe-batches", type=int, default=1000)
    ap.add_argument("--serve-model", default="smollm2-135m")
    ap.add_argument("--serve-child", choices=["shared", "separate"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.serve_child:
        print(json.dumps(serve_memory(args.serve_child == "shared", args.serve_model)))
        return 0
    METHODS["growing-bench"] = f"{__name__}:GrowingMethod"
    parts = set(args.parts.split(","))
    record: dict[str, Any] = {
        "benchmark": "store_incremental",
        "command": " ".join(["benchmarks/store_incremental.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "load_average_start": os.getloadavg(),
        "note": "shared 2-core machine; OMP_NUM_THREADS=1; every batch is applied, checkpointed (checkpoint_every=1, "
        "keep 3) and published to two replicas; window means are over the last 10 batches of each window",
    }
    if "growing" in parts:
        options = {"row_floats": args.row_kb * 256}
        record["growing"] = run_stream("growing-bench", options, args.batches, WINDOWS)
    if "lemoe" in parts:
        record["lemoe"] = run_stream("lemoe", {"steps": 1}, args.lemoe_batches, WINDOWS)
    if "serve" in parts:
        record["serve"] = []
        for mode in ("shared", "separate"):
            cmd = [sys.executable, __file__, "--serve-child", mode, "--serve-model", args.serve_model]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            record["serve"].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(record["serve"][-1]), flush=True)
    record["load_average_end"] = os.getloadavg()
    if args.out:
        from lemoe.runner.runner import write_results

        write_results(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
