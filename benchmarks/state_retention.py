"""Retention of pre-existing knowledge under a saved edited state (any method, any checkpoint).

Loads ``state`` (a ``save_pretrained`` folder, e.g. a runner checkpoint's ``state-C-SSSS``) onto the
unedited model and scores the same retention sets as ``oedit_compare.py`` (held-out knowns token
accuracy, held-out text perplexity), before and after, plus one greedy continuation as a sanity
look. It answers "how broken was the model at step S" without rerunning the S steps::

    mkdir -p /tmp/ck && git archive ff14594 docs/results/raw/checkpoints | tar -x -C /tmp/ck
    .venv/bin/python benchmarks/state_retention.py \\
        /tmp/ck/docs/results/raw/checkpoints/memit-counterfact-T1500/state-0-1075
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from oedit_compare import SHARED, retention, retention_sets

from lemoe.methods import load_method
from lemoe.models import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state", help="folder written by a method's save_pretrained")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--retention-n", type=int, default=100)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    model, tok = load_model(args.model, device=args.device)
    facts, texts = retention_sets(Path(args.data_dir), args.retention_n)
    before = retention(model, tok, facts, texts)
    method = load_method(args.state, model, tok)
    after = retention(model, tok, facts, texts)
    ids = tok(args.prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    continuation = tok.decode(out[0, ids.input_ids.shape[1] :])
    print(
        json.dumps(
            {
                "state": args.state,
                "method": method.name,
                "before": before,
                "after": after,
                "prompt": args.prompt,
                "continuation": continuation,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
