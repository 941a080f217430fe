"""Routing cost per query against the number of keys, exact scoring vs. the HNSW candidate index.

Keys are real: LEMoE's subject keys (three contexts per subject, as in training) for the first N
edits of ``counterfact_train.json`` in file order, one expert per batch of 10, read on SmolLM2-135M
exactly as ``LEMoE._apply`` stores them (no experts are trained: routing does not read them).
Queries are the prompts, first paraphrases and first neighbourhood prompts of 100
``counterfact_val.json`` records (unrelated to the keys: null-route traffic, the common case) and
100 of the edited prompts' own paraphrases (traffic that must reach an expert). For each N it
reports seconds per query of ``route_prompts`` (process CPU time, the clause router as at
inference) for ``route_index=exact`` and ``hnsw``, and how many decisions the index changes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lemoe_index.py --keys 1000 3000 10000 \\
        --out docs/results/raw/lemoe_index.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from lemoe.data import load_requests
from lemoe.methods import build_method
from lemoe.models import load_model

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact"


def timed_routes(method, prompts: list[str]) -> tuple[torch.Tensor, float]:
    t = time.process_time()
    out = method.route_prompts(prompts)
    return out, (time.process_time() - t) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--neighbours", type=int, default=32)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m")
    edits = load_requests("counterfact", SHARED / "counterfact_train.json")
    val = load_requests("counterfact", SHARED / "counterfact_val.json")[: args.queries]
    unrelated = [r.prompt for r in val] + [r.paraphrases[0] for r in val if r.paraphrases]
    unrelated += [r.locality[0].prompt for r in val if r.locality]
    options = {"route_index_neighbours": args.neighbours, "route_index_min_slots": 1}
    exact = build_method("lemoe", model, tokenizer, {"route_index": "exact"})
    indexed = build_method("lemoe", model, tokenizer, {**options, "route_index": "hnsw"})
    exact._ensure_calibrated()
    rows, done = [], 0
    for n in sorted(args.keys):
        t0 = time.process_time()
        for e in range(done // args.batch, n // args.batch):  # keys as LEMoE._apply adds them
            exact._add_subject_keys(edits[e * args.batch : (e + 1) * args.batch], e)
        done = n
        build_keys_s = time.process_time() - t0
        indexed.edits.router.keys = exact.router.keys  # the same table, with its own index
        for f in ("key_expert", "slot_key", "slot_offset", "slot_threshold", "next_key"):
            setattr(indexed.edits.router, f, getattr(exact.router, f))
        indexed.router.index = None
        t0 = time.process_time()
        indexed.router._slot_index()
        build_index_s = time.process_time() - t0
        owned = [r.paraphrases[0] for r in edits[: n : max(1, n // args.queries)] if r.paraphrases]
        row = {"keys": n, "slots": exact.router.size, "build_keys_cpu_s": build_keys_s}
        row["build_index_cpu_s"] = build_index_s
        for name, prompts in (("unrelated", unrelated), ("edited_paraphrases", owned)):
            want, exact_s = timed_routes(exact, prompts)
            got, index_s = timed_routes(indexed, prompts)
            row[name] = {
                "queries": len(prompts),
                "exact_s_per_query": exact_s,
                "hnsw_s_per_query": index_s,
                "speedup": exact_s / index_s if index_s else None,
                "decisions_changed": int((want != got).sum()),
                "routed_exact": int((want >= 0).sum()),
                "routed_hnsw": int((got >= 0).sum()),
            }
        row["key_bytes"] = sum(t.numel() * t.element_size() for t in exact.router.tensors().values())
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "benchmark": "lemoe_index",
        "command": "python benchmarks/lemoe_index.py " + " ".join(sys.argv[1:]),
        "model": "smollm2-135m",
        "neighbours": args.neighbours,
        "machine": platform.machine(),
        "note": "process CPU seconds, 1 thread; route_prompts with the default clause router",
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
