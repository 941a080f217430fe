"""LEMoE benchmarks: lifelong runs with routing diagnostics, and generation latency vs experts.

    python benchmarks/lemoe_bench.py run --data zsre --edits 100 --edits-per-step 1 --out s.json [--opt k=v ...]
    python benchmarks/lemoe_bench.py run --method ft-m --data zsre --edits 100 --out s.json
    python benchmarks/lemoe_bench.py latency --experts 0 10 100 --out latency.json

``run`` uses the protocol runner (final-model evaluation, token accuracy + exact match) and adds,
for LEMoE: routing consistency (share of edit prompts routed to their own expert after the last
edit), the paraphrase routing rate, the null-route rate on locality probes, experts and parameters
added. Records the data set cannot turn into valid requests (ZsRE dev has one with an empty
``alt``) are skipped and counted. Writes a small summary JSON (no per-request scores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lemoe.cli.options import parse_option as _parse_option
from lemoe.data.loaders import LOADERS, zsre_record
from lemoe.evaluation import Evaluator
from lemoe.methods import build_method
from lemoe.models import load_model
from lemoe.requests import EditRequest, InvalidRequestError, validate_request
from lemoe.runner import Protocol, format_table, run_protocol

DATA = {
    "zsre": "../shared/data/zsre/zsre_dev.json",
    "counterfact": "../shared/data/counterfact/counterfact_val.json",
}


def load_valid(kind: str, path: str) -> tuple[list[EditRequest], int]:
    """Requests from ``path``, skipping (and counting) records that fail validation."""
    out, skipped = [], 0
    for rec in json.loads(Path(path).read_text()):
        try:
            req = zsre_record(rec) if kind == "zsre" else LOADERS[kind](rec)
            validate_request(req)
        except (InvalidRequestError, KeyError, TypeError, IndexError):
            skipped += 1
            continue
        out.append(req)
    return out, skipped


def routing_report(method: Any, requests: list[EditRequest]) -> dict[str, float]:
    owner = {rid: e for e, ids in enumerate(method.edits.expert_requests) for rid in ids}
    own = torch.tensor([owner[r.request_id] for r in requests])
    got = method.route_prompts([r.prompt for r in requests])
    para = [(i, p) for i, r in enumerate(requests) for p in r.paraphrases]
    loc = [p.prompt for r in requests for p in r.locality]
    rep = {"routing_consistency": float((got == own).float().mean())}
    if para:
        pg = method.route_prompts([p for _, p in para])
        rep["paraphrase_routed_to_own"] = float((pg == own[[i for i, _ in para]]).float().mean())
        rep["paraphrase_null_rate"] = float((pg < 0).float().mean())
    if loc:
        rep["locality_null_route_rate"] = float((method.route_prompts(loc) < 0).float().mean())
    rep["experts"] = method.n_experts
    rep["params_per_expert"] = method.parameters_per_expert()
    rep["params_added_per_edit"] = method.parameters_per_expert() * method.n_experts / len(requests)
    rep["null_threshold"] = method.calibration.threshold
    return rep


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    requests, skipped = load_valid(args.data, args.path or DATA[args.data])
    model, tokenizer = load_model("smollm2-135m")
    method = build_method(args.method, model, tokenizer, dict(args.opt))
    protocol = Protocol(edits=args.edits, edits_per_step=args.edits_per_step, evaluate="final", chunk=args.chunk)
    t0 = time.perf_counter()

    def log_step(entry: dict[str, Any]) -> None:
        if entry["step"] % 10 == 0:
            print(
                f"step {entry['step']} {entry['seconds']:.2f}s {entry['info']} t={time.perf_counter() - t0:.0f}s",
                flush=True,
            )

    record = run_protocol(
        method,
        requests,
        protocol,
        Evaluator(model, tokenizer),
        evaluate_pre=not args.no_pre,
        progress=False,
        on_step=log_step,
    )
    summary = {
        "command": "python benchmarks/lemoe_bench.py " + " ".join(args.argv),
        "data": {"kind": args.data, "path": args.path or DATA[args.data], "skipped_invalid_records": skipped},
        "model": "smollm2-135m",
        "method": record["method"],
        "protocol": record["protocol"],
        "aggregate": record["aggregate"],
        "pre_edit": record["pre_edit"],
        "cost": record["cost"],
        "wall_seconds": time.perf_counter() - t0,
        "steps_per_batch_mean": sum(s["info"].get("steps", 0) for s in record["steps"]) / max(len(record["steps"]), 1),
        "environment": record["environment"],
    }
    if args.method == "lemoe" and not args.chunk:
        summary["routing"] = routing_report(method, protocol.order_requests(requests))
    print(format_table(record))
    print(json.dumps({k: summary[k] for k in ("routing", "cost") if k in summary}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))


@torch.no_grad()
def cmd_latency(args: argparse.Namespace) -> None:
    """Greedy generation time of the base model vs LEMoE with N experts (random expert weights and
    random anchors: the cost does not depend on their values). Prompts are routed to experts
    (worst case: every sequence runs an expert); timings are medians over repeats."""
    from lemoe.evaluation.scorers import greedy_generate

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    requests, _ = load_valid("zsre", DATA["zsre"])
    prompts = [tokenizer(r.prompt)["input_ids"] for r in requests[: args.batch]]

    def once(context: Any) -> float:
        # CPU time of this process: on a shared, oversubscribed machine wall time mostly measures
        # the other jobs' load.
        t = time.process_time()
        greedy_generate(
            model, tokenizer, prompts, [args.new_tokens] * len(prompts), batch_size=args.batch, context=context
        )
        return time.process_time() - t

    def paired(context: Any) -> tuple[float, float]:
        """Base and edited timed alternately (the shared CPU's load drifts), medians of repeats."""
        base, edited = [], []
        for _ in range(args.repeats):
            with method.disabled():
                base.append(once(no_context))
            edited.append(once(context))
        return sorted(base)[len(base) // 2], sorted(edited)[len(edited) // 2]

    from lemoe.evaluation.scorers import no_context

    once(no_context)  # warm-up
    rows = []
    for n in args.experts:
        method = build_method("lemoe", model, tokenizer, dict(args.opt))
        method._ensure_calibrated()
        g = torch.Generator().manual_seed(0)
        from lemoe.methods.lemoe.experts import Expert

        for _ in range(n):
            e = Expert(method.d_in, method.d_out, method.config.expert_width, method.init_std, g)
            torch.nn.init.normal_(e.w2, std=1e-3, generator=g)
            method.edits.bank = method.bank.append(e)
        if n:
            # real keys: one edit per expert (ZsRE records 0..n-1, so the timed prompts 0..batch-1
            # are among them and every sequence is routed: the worst case); the scoring cost grows
            # with the number of keys as it would after n real edits
            method.edits.expert_batches = list(range(n))
            method.edits.expert_requests = [[] for _ in range(n)]
            if method.config.route_key == "subject":
                for i in range(n):
                    method._add_subject_keys([requests[i % len(requests)]], i)
            else:
                q = method.routing_embeddings([r.prompt for r in requests[:n]])
                method.router.keys, method.router.key_expert = q, torch.arange(n)
        routed = method.route_prompts([r.prompt for r in requests[: args.batch]]) if n else None
        assert routed is None or bool((routed >= 0).all()), "latency needs every timed prompt routed"
        base, edited = paired(method.forward_context)
        method.remove_hooks()
        nbytes = {
            name: sum(t.numel() * t.element_size() for t in group.values())
            for name, group in (("expert_bytes", method.bank.tensors()), ("key_bytes", method.router.tensors()))
        }
        rows.append({"experts": n, "base_cpu_s": base, "edited_cpu_s": edited, "ratio": edited / base, **nbytes})
        print(rows[-1])
    out = {
        "command": "python benchmarks/lemoe_bench.py " + " ".join(args.argv),
        "model": "smollm2-135m",
        "options": dict(args.opt),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
        "note": "shared 2-core CPU; process CPU seconds, medians of repeats; every sequence routed to an expert",
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


def main() -> None:
    import sys

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--method", default="lemoe")
    r.add_argument("--data", choices=sorted(DATA), default="zsre")
    r.add_argument("--path", default=None)
    r.add_argument("--edits", type=int, default=100)
    r.add_argument("--edits-per-step", type=int, default=1)
    r.add_argument("--chunk", type=int, default=None, help="independent runs of this many edits (WISE T < total)")
    r.add_argument("--opt", action="append", type=_parse_option, default=[])
    r.add_argument("--no-pre", action="store_true")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", default=None)
    r.set_defaults(func=cmd_run)
    lat = sub.add_parser("latency")
    lat.add_argument("--experts", type=int, nargs="+", default=[0, 10, 100])
    lat.add_argument("--batch", type=int, default=16)
    lat.add_argument("--new-tokens", type=int, default=16)
    lat.add_argument("--repeats", type=int, default=5)
    lat.add_argument("--threads", type=int, default=2)
    lat.add_argument("--opt", action="append", type=_parse_option, default=[], help="LEMoE option key=value")
    lat.add_argument("--out", default=None)
    lat.set_defaults(func=cmd_latency)
    args = p.parse_args()
    args.argv = sys.argv[1:]
    args.func(args)


if __name__ == "__main__":
    main()
