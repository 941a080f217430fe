"""Every registered method end to end on a tiny random model on one torch device (e.g. ``cuda``).

The test suite runs on CPU (CI has no accelerator); this script is the check that nothing in a
method, the evaluator or the runner silently assumes CPU tensors. For each method it applies four
edits in two steps, evaluates after each step (exact match on), saves the state, loads it into a
fresh model on the same device and checks the loaded method scores the same; MALMEN / MEND-sum also
take two meta-training steps. Prints one line per method and exits non-zero if any failed.

    python benchmarks/device_smoke.py --device cuda --tokenizer ~/.cache/lemoe/models/smollm2-135m
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from lemoe.data import load_spec
from lemoe.evaluation import Evaluator
from lemoe.methods import build_method, load_method, method_names
from lemoe.models.loading import builtin_model_path, prepare_tokenizer
from lemoe.runner import Protocol, run_protocol
from lemoe.testing import tiny_model


def small_options(corpus: str) -> dict[str, dict[str, Any]]:
    """Options that make each method fast on a 4-layer, 64-wide model (as in the tests)."""
    locate = {"layers": [1, 2], "stats_corpus": corpus, "stats_samples": 12, "stats_max_tokens": 16, "v_steps": 4,
              "key_contexts": 1, "context_length": 3}  # fmt: skip
    oedit = {"knowledge_rank": 8, "knowledge_samples": 24, "steps": 8, "cache_knowledge": False}
    return {
        "ft-l": {"layer": 2, "steps": 4},
        "ft-m": {"layer": 2, "steps": 4},
        "memit": locate,
        "alphaedit": locate,
        "coachhook": locate,
        "malmen": {"n_layers": 2, "rank": 16},
        "mend-sum": {"n_layers": 2, "rank": 16},
        "oedit": oedit,
        "oedit-plus": oedit,
        "lemoe": {"layer": 2, "steps": 10},
    }


def check(name: str, options: dict[str, Any], tok: Any, device: str, requests: list) -> str:
    model = tiny_model("llama").to(device)
    method = build_method(name, model, tok, dict(options))
    if name in ("malmen", "mend-sum"):
        from lemoe.methods.malmen.train import meta_step

        method.net.requires_grad_(True)  # a built editor is frozen; the trainer unfreezes it
        opt = torch.optim.Adam(method.net.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            meta_step(method, requests[:4])
            opt.step()
        method.net.requires_grad_(False)
    evaluator = Evaluator(model, tok, exact_match=True)
    record = run_protocol(
        method, requests, Protocol(edits=4, edits_per_step=2, evaluate="every:1"), evaluator, progress=False
    )
    rel = record["aggregate"]["reliability.token_acc"]
    with tempfile.TemporaryDirectory() as tmp:
        method.save_pretrained(tmp)
        fresh = tiny_model("llama").to(device)
        loaded = load_method(tmp, fresh, tok)
        ev2 = Evaluator(fresh, tok, exact_match=False)
        again = ev2.evaluate(requests[:4], ev2.reference(requests[:4]), loaded.forward_context)
    rel2 = again.aggregate["reliability.token_acc"]
    if abs(rel - rel2) > 1e-4:
        raise AssertionError(f"loaded state scores {rel2:.4f}, edited run {rel:.4f}")
    return f"rel {rel:.3f} (loaded {rel2:.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the built-in model's)")
    ap.add_argument("--methods", default=",".join(method_names()))
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or builtin_model_path("smollm2-135m"))
    prepare_tokenizer(tok)
    requests, _ = load_spec("zsre:sample")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("".join(f"Sentence {i} talks about rivers, kings, music and Paris.\n" for i in range(12)))
        options = small_options(str(corpus))
        for name in args.methods.split(","):
            t0 = time.perf_counter()
            try:
                msg = check(name, options.get(name, {}), tok, args.device, requests[:4])
                print(f"OK   {name:10} {msg} {time.perf_counter() - t0:.1f}s", flush=True)
            except Exception:  # report every method, then fail
                failed.append(name)
                print(f"FAIL {name:10}\n{traceback.format_exc()}", flush=True)
    print(f"{len(failed)} failed: {failed}" if failed else "all methods ran on " + args.device)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
