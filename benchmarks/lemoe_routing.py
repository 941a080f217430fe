"""LEMoE routing ablation without training: how well KV-anchor routing sends paraphrases to their
edit's expert and locality probes to the null route, for each routing representation and
null-route calibration.

Routing depends only on the anchors (the routing embeddings of the edit prompts) and the calibrated
threshold, not on the experts' weights, so it is measured here for every edit of the data set as if
each batch had been applied: anchors are exactly what ``LEMoE._apply`` stores. The paraphrase rate
is an upper bound on generality; the locality null-route rate is what keeps locality at 1.

    python benchmarks/lemoe_routing.py --out docs/results/raw/lemoe_routing.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lemoe_bench import DATA, load_valid

from lemoe.methods import build_method
from lemoe.methods.lemoe.generic import GENERIC_PROMPTS
from lemoe.models import load_model


def measure(method, requests, batch: int) -> dict[str, float]:
    """Store anchors for every edit exactly as ``LEMoE._apply`` does (batches of ``batch`` in file
    order, expert e for batch e), then route prompts, paraphrases and locality probes."""
    own = torch.arange(len(requests)) // batch
    if method.config.route_key == "subject":
        method._ensure_calibrated()
        for e, i in enumerate(range(0, len(requests), batch)):
            method._add_subject_keys(requests[i : i + batch], e)
    else:
        q = method.routing_embeddings([r.prompt for r in requests])
        owner = own
        if method.config.anchor_keys == "centroid":
            n = int(owner.max()) + 1
            q = torch.nn.functional.normalize(torch.stack([q[owner == e].mean(0) for e in range(n)]), dim=-1)
            owner = torch.arange(n)
        method.router.keys, method.router.key_expert = q, owner
    para = method.route_prompts([r.paraphrases[0] for r in requests])
    loc = method.route_prompts([r.locality[0].prompt for r in requests])
    prompt = method.route_prompts([r.prompt for r in requests])
    return {
        "prompt_routed_to_own": float((prompt == own).float().mean()),
        "paraphrase_routed_to_own": float((para == own).float().mean()),
        "paraphrase_null": float((para < 0).float().mean()),
        "locality_null_route_rate": float((loc < 0).float().mean()),
        "threshold": method.calibration.threshold if method.config.route_key == "prompt" else None,
        "route_layer": method.route_layer,
        "null_margin": method.null_margin,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=sorted(DATA), default="zsre")
    p.add_argument("--edits", type=int, default=499)
    p.add_argument("--out", default=None)
    p.add_argument("--only", type=int, nargs="*", help="indices of the variants to run")
    args = p.parse_args()
    requests, _ = load_valid(args.data, DATA[args.data])
    requests = requests[: args.edits]
    model, tokenizer = load_model("smollm2-135m")
    generic_only = list(GENERIC_PROMPTS)
    variants = [
        ("subject span, route_layer=4, margin 0.3 (default)", {}, 1),
        ("subject, margin 0.2", {"null_margin": 0.2}, 1),
        ("subject, margin 0.1", {"null_margin": 0.1}, 1),
        ("subject, margin 0.0", {"null_margin": 0.0}, 1),
        ("subject, route_layer=2", {"route_layer": 2}, 1),
        ("subject, route_layer=6", {"route_layer": 6}, 1),
        ("subject, no separator prefix", {"route_prefix": False}, 1),
        ("subject, calibration on generic prompts only", {"calibration_texts": generic_only}, 1),
        ("subject, no null route", {"null_route": False}, 1),
        ("subject, batches of 10", {}, 10),
        ("prompt mean, route_layer=1 (previous default)", {"route_key": "prompt"}, 1),
        (
            "prompt mean, route_layer=0 (input embeddings, the paper's input)",
            {"route_key": "prompt", "route_layer": 0},
            1,
        ),
        ("prompt mean, route_layer=1, no null route", {"route_key": "prompt", "null_route": False}, 1),
        ("prompt mean, batches of 10, one centroid key", {"route_key": "prompt", "anchor_keys": "centroid"}, 10),
    ]
    rows = []
    for i, (name, opts, batch) in enumerate(variants):
        if args.only and i not in args.only:
            continue
        method = build_method("lemoe", model, tokenizer, opts)
        row = {"variant": name, "options": opts, "edits_per_expert": batch, **measure(method, requests, batch)}
        method.remove_hooks()
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": "python benchmarks/lemoe_routing.py " + " ".join(sys.argv[1:]),
                    "model": "smollm2-135m",
                    "data": args.data,
                    "edits": len(requests),
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
