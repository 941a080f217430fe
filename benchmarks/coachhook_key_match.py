"""Which edit prompts match their own stored key weakly under CoachHooK's ``scope_score=key``?

The key rule stores, per edit, the key that MEMIT writes (``compute_ks``: the subject's last token,
averaged over the bare prompt and ``key_contexts`` prefixed copies), whitened by ``C0``. At use the
bare prompt's own key is compared with it. This script measures, per request and edited layer, the
whitened cosine between the two and where the subject sits in the prompt, so the weak matches that
drag the dynamic α down can be explained (and a fix measured).

    .venv/bin/python benchmarks/coachhook_key_match.py --data counterfact:PATH --n 300 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lemoe.data.loaders import load_requests
from lemoe.methods import build_method
from lemoe.methods.coachhook.hooks import whitened_unit, whitening
from lemoe.methods.locate.compute import compute_ks, sites
from lemoe.models import load_model
from lemoe.models.access import ModelAccess


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True, help="FORMAT:PATH, e.g. counterfact:counterfact_val.json")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    fmt, _, path = args.data.partition(":")
    model, tok = load_model(args.model, device=args.device)
    requests = load_requests(fmt, path)[: args.n]
    method = build_method("coachhook", model, tok, {"scope_score": "key"})
    method.prepare()
    access = ModelAccess(model)
    # position of the subject's last token in the bare prompt (0 = the sequence's first token)
    positions = [row[0].index for row in sites(tok, requests, ["{}"])]
    report: dict[str, object] = {"model": args.model, "data": args.data, "n": len(requests), "layers": {}}
    for layer in method.layers:
        white = whitening(method.mom2()[layer])
        stored = whitened_unit(compute_ks(access, tok, layer, requests, method.key_templates()), white)
        bare = whitened_unit(compute_ks(access, tok, layer, requests, ["{}"]), white)
        cos = (stored * bare).sum(-1).tolist()
        order = sorted(range(len(cos)), key=cos.__getitem__)
        weak = order[: max(1, len(cos) // 10)]  # the 10 % weakest own-key matches
        early = [i for i in range(len(cos)) if positions[i] <= 1]
        report["layers"][str(layer)] = {  # type: ignore[index]
            "cos_median": statistics.median(cos),
            "cos_q10": cos[order[len(cos) // 10]],
            "cos_min": cos[order[0]],
            "share_subject_ends_at_token_0_or_1": len(early) / len(cos),
            "share_of_weakest_10pct_with_subject_ending_at_0_or_1": sum(positions[i] <= 1 for i in weak) / len(weak),
            "cos_median_subject_ends_at_0_or_1": statistics.median([cos[i] for i in early]) if early else None,
            "cos_median_other": statistics.median([cos[i] for i in range(len(cos)) if positions[i] > 1]),
            "weakest": [
                {"cos": cos[i], "prompt": requests[i].prompt, "subject": requests[i].subject, "position": positions[i]}
                for i in order[:8]
            ],
        }
        row = report["layers"][str(layer)]  # type: ignore[index]
        print(
            f"layer {layer}: median {row['cos_median']:.3f} q10 {row['cos_q10']:.3f} | subject ending at token 0-1: "
            f"{row['share_subject_ends_at_token_0_or_1']:.2f} of all, "
            f"{row['share_of_weakest_10pct_with_subject_ending_at_0_or_1']:.2f} of the weakest 10 % | "
            f"median there {row['cos_median_subject_ends_at_0_or_1']} vs {row['cos_median_other']:.3f}",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
