"""Scaling curve of MALMEN vs MEND-sum: edits per batch 1..1024 on CounterFact val.

    python benchmarks/malmen_scaling.py --editor DIR --out docs/results/raw/malmen_scaling.json

Protocol: for every batch size N, the *same* evaluated edits (the first ``--eval-edits`` records
of the file) are edited and scored. For N < eval-edits they are split into groups of N, each
group edited in one batch from the unedited model and scored, then reset; for N >= eval-edits
the first N records are edited in one batch (the evaluated ones plus N - eval-edits others) and
the evaluated ones are scored. Scores come from lemoe's Evaluator (teacher-forced token accuracy;
locality = argmax agreement with the unedited model, cached before any edit; unless
``--no-exact-match``, also greedy exact match and, for locality, agreement of the greedy
continuation with the unedited model's).

The LM pass (keys and value-gradients at answer tokens) is run once for all N records and
reused for every group and batch size: it depends only on the unedited model and the edit, not
on which edits share the batch (see tests/test_malmen.py). Its time is charged per fact.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from lemoe.data import load_requests
from lemoe.evaluation import Evaluator
from lemoe.methods import build_method
from lemoe.methods.malmen.cache import KeyGradCache, collect
from lemoe.models import load_model
from lemoe.runner.runner import HEADLINE
from lemoe.tokens import encode_pairs

KEYS = [key for key, _ in HEADLINE]  # the runner's headline metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--editor", required=True, help="trained editor folder (trainer's DIR/editor or DIR/best)")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_val.json")
    ap.add_argument("--sizes", default="1,4,16,64,256,1024")
    ap.add_argument("--eval-edits", type=int, default=64)
    ap.add_argument("--methods", default="malmen,mend-sum")
    ap.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-exact-match", action="store_true", help="skip greedy exact-match scoring (faster)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    n_max = max(max(sizes), args.eval_edits)

    requests = load_requests("counterfact", args.data)[:n_max]
    evaluated = requests[: args.eval_edits]
    model, tok = load_model(device=args.device)
    evaluator = Evaluator(model, tok, exact_match=not args.no_exact_match)
    methods = {name: build_method(name, model, tok, {"editor": args.editor}) for name in args.methods.split(",")}
    first = next(iter(methods.values()))

    t0 = time.perf_counter()
    reference = evaluator.reference(evaluated)
    pre = evaluator.evaluate(evaluated, reference).aggregate
    print("unedited", {k: round(pre[k], 3) for k in KEYS if k in pre}, flush=True)

    # One LM pass over all records; rows of each edit are contiguous (answer-token count each).
    t0 = time.perf_counter()
    full = KeyGradCache(len(first.layers), memory_mb=4096)
    collect(
        model,
        first.access,
        first.layers,
        tok,
        [r.prompt for r in requests],
        [r.target_new for r in requests],
        full,
        lm_batch_size=first.config.lm_batch_size,
    )
    lm_seconds = time.perf_counter() - t0
    counts = [
        len(p.answer_ids) for p in encode_pairs(tok, [r.prompt for r in requests], [r.target_new for r in requests])
    ]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    slots = [next(full.chunks(s, offsets[-1])) for s in range(len(first.layers))]
    assert all(k.shape[0] == offsets[-1] for k, _ in slots), "answer-token count mismatch"
    print(f"LM pass: {len(requests)} edits, {offsets[-1]} answer tokens, {lm_seconds:.1f}s", flush=True)

    def sub_cache(lo: int, hi: int) -> KeyGradCache:
        cache = KeyGradCache(len(slots), memory_mb=4096)
        for s, (k, g) in enumerate(slots):
            cache.add(s, k[offsets[lo] : offsets[hi]], g[offsets[lo] : offsets[hi]])
        return cache

    results = []
    for n in sizes:
        groups = (
            [(lo, min(lo + n, args.eval_edits)) for lo in range(0, args.eval_edits, n)]
            if n < args.eval_edits
            else [(0, n)]
        )
        for name, method in methods.items():
            per_request: list[dict[str, float]] = []
            solve_seconds = eval_seconds = 0.0
            for lo, hi in groups:
                method.reset()
                t1 = time.perf_counter()
                with sub_cache(lo, hi) as cache:
                    shifts = method.predict_shifts(cache)
                method.add_shifts(shifts)
                solve_seconds += time.perf_counter() - t1
                scored = requests[lo : min(hi, args.eval_edits)]
                t2 = time.perf_counter()
                per_request += evaluator.evaluate(scored, reference).per_request
                eval_seconds += time.perf_counter() - t2
            method.reset()
            agg = {k: sum(r[k] for r in per_request) / len(per_request) for k in KEYS if k in per_request[0]}
            n_facts = sum(hi - lo for lo, hi in groups)
            row = {
                "method": name,
                "edits_per_batch": n,
                "batches": len(groups),
                "evaluated_edits": len(per_request),
                **agg,
                "hypernet_and_solve_seconds_per_batch": solve_seconds / len(groups),
                "edit_seconds_per_fact": lm_seconds / len(requests) + solve_seconds / n_facts,
                "eval_seconds": eval_seconds,
            }
            results.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    record = {
        "protocol": f"CounterFact val ({args.data}): the first {args.eval_edits} records edited in batches of N "
        f"(N < {args.eval_edits}: independent groups; N >= {args.eval_edits}: the first N records in one batch), "
        "each batch from the unedited model, scored right after its batch",
        "editor": args.editor,
        "exact_match": not args.no_exact_match,
        "editor_config": first.config.to_dict(),
        "model": "smollm2-135m",
        "unedited": pre,
        "lm_pass": {"edits": len(requests), "answer_tokens": offsets[-1], "seconds": lm_seconds},
        "results": results,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "machine": "shared 2-core CPU (other jobs running)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
