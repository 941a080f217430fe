"""Evaluation throughput: probes per second of each scorer on the default model.

Usage: python benchmarks/eval_throughput.py [--data zsre:sample] [--n 100] [--batch-size 64]
Prints a JSON line; the numbers in docs/results.md came from this script.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lemoe import tokens
from lemoe.data import load_spec
from lemoe.evaluation import Evaluator, scorers
from lemoe.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="zsre:sample")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    requests, _ = load_spec(args.data)
    requests = requests[: args.n]
    ev = Evaluator(model, tok, batch_size=args.batch_size)
    probes = [(r.prompt, r.target_new) for r in requests]
    probes += [(p, r.target_new) for r in requests for p in r.paraphrases]
    probes += [(p.prompt, p.answer) for r in requests for p in r.locality]
    pairs = tokens.encode_pairs(tok, [p for p, _ in probes], [a for _, a in probes])

    t = time.perf_counter()
    scorers.teacher_forced_predictions(model, tok, pairs, batch_size=args.batch_size)
    tf_s = time.perf_counter() - t
    t = time.perf_counter()
    ev._generate(pairs, scorers.no_context)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    ref = ev.reference(requests)
    ev.evaluate(requests, ref)
    full_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "probes": len(pairs),
                "threads": torch.get_num_threads(),
                "teacher_forced_probes_per_s": len(pairs) / tf_s,
                "greedy_exact_match_probes_per_s": len(pairs) / gen_s,
                "full_evaluation_seconds (reference + all scorers)": full_s,
                "requests": len(requests),
            }
        )
    )


if __name__ == "__main__":
    main()
