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
from lemoe.models import load_model


def measure(method, requests, batch: int) -> dict[str, float]:
    q = method.routing_embeddings([r.prompt for r in requests])
    owner = torch.arange(len(requests)) // batch
    if method.config.anchor_keys == "centroid":
        n = int(owner.max()) + 1
        q = torch.nn.functional.normalize(torch.stack([q[owner == e].mean(0) for e in range(n)]), dim=-1)
        owner = torch.arange(n)
    method.keys, method.key_expert = q, owner
    own = torch.arange(len(requests)) // batch
    para = method.route_prompts([r.paraphrases[0] for r in requests])
    loc = method.route_prompts([r.locality[0].prompt for r in requests])
    prompt = method.route_prompts([r.prompt for r in requests])
    return {
        "prompt_routed_to_own": float((prompt == own).float().mean()),
        "paraphrase_routed_to_own": float((para == own).float().mean()),
        "paraphrase_null": float((para < 0).float().mean()),
        "locality_null_route_rate": float((loc < 0).float().mean()),
        "threshold": method.threshold,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=sorted(DATA), default="zsre")
    p.add_argument("--edits", type=int, default=499)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    requests, _ = load_valid(args.data, DATA[args.data])
    requests = requests[: args.edits]
    model, tokenizer = load_model("smollm2-135m")
    variants = [
        ("route_layer=0 (input embeddings)", {"route_layer": 0}, 1),
        ("route_layer=1 (default)", {}, 1),
        ("route_layer=2", {"route_layer": 2}, 1),
        ("route_layer=4", {"route_layer": 4}, 1),
        ("route_layer=1, null_margin=0.05", {"null_margin": 0.05}, 1),
        ("route_layer=1, null_quantile=0.9", {"null_quantile": 0.9}, 1),
        ("route_layer=1, no null route", {"null_route": False}, 1),
        ("route_layer=1, batches of 10, key per request", {}, 10),
        ("route_layer=1, batches of 10, one centroid key", {"anchor_keys": "centroid"}, 10),
    ]
    rows = []
    for name, opts, batch in variants:
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
