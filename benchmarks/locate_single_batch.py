"""One locate-then-edit batch on the first N ZsRE dev records: pre/post scores and timings.

Usage: python benchmarks/locate_single_batch.py [--method memit] [--n 10] [KEY=VALUE ...]
(options are method config values, parsed as JSON when possible, e.g. mom2_weight=15000).
Scores: teacher-forced token accuracy (Rel, Gen), agreement with the unedited model (Loc).
"""

from __future__ import annotations

import argparse
import json
import time

from lemoe.data import load_spec
from lemoe.evaluation import Evaluator
from lemoe.methods import build_method
from lemoe.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="memit")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--data", default="zsre:../shared/data/zsre/zsre_dev.json")
    parser.add_argument("options", nargs="*")
    args = parser.parse_args()
    options = {}
    for item in args.options:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    model, tok = load_model()
    requests = load_spec(args.data)[0][: args.n]
    evaluator = Evaluator(model, tok, exact_match=False)
    reference = evaluator.reference(requests)
    print("pre ", evaluator.evaluate(requests, reference).aggregate, flush=True)
    method = build_method(args.method, model, tok, options)
    start = time.perf_counter()
    method.prepare()  # statistics (disk cache) and context templates, once
    prepare = time.perf_counter() - start
    report = method.apply(requests)
    print(f"prepare {prepare:.1f} s, batch {report.seconds:.1f} s", report.info, flush=True)
    print("post", evaluator.evaluate(requests, reference, method.forward_context).aggregate, flush=True)


if __name__ == "__main__":
    main()
