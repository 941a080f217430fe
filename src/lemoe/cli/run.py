"""``lemoe run``, ``lemoe demo`` and ``lemoe eval``: a protocol on a method, and re-scoring."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lemoe.cli.options import parse_option

DEMO_EDITS = 20


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    from lemoe.evaluation.kinds import ALL_PROBES

    p.add_argument(
        "--skip-probe",
        action="append",
        choices=ALL_PROBES,
        default=[],
        metavar="KIND",
        help=f"leave out a probe kind (repeatable): {', '.join(ALL_PROBES)}; 'chat' needs a tokenizer chat template",
    )


def probes_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    from lemoe.evaluation.kinds import ALL_PROBES

    return tuple(k for k in ALL_PROBES if k not in args.skip_probe)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from lemoe.methods import method_names
    from lemoe.models.builtin import DEFAULT_MODEL

    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"built-in name, local folder or hub id (default {DEFAULT_MODEL})"
    )
    p.add_argument("--method", default="lemoe", help=f"editing method: {', '.join(method_names())}")
    p.add_argument(
        "--data",
        default="zsre:sample",
        help="KIND:PATH, KIND in zsre, counterfact, hallucination, temporal, jsonl; PATH 'sample' = packaged sample",
    )
    p.add_argument("--zsre-target", choices=["alt", "answer"], default="alt", help="ZsRE edit target (default alt)")
    p.add_argument("--edits", type=int, default=DEMO_EDITS, help="total number of edits")
    p.add_argument("--edits-per-step", type=int, default=1, help="edits applied per step (batch size)")
    p.add_argument("--eval", dest="evaluate", default="final", help="final | every:K | immediate")
    p.add_argument("--chunk", type=int, default=None, help="split the edits into independent runs of this size")
    p.add_argument("--order", choices=["given", "shuffle"], default="given", help="order of the data stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--opt", action="append", type=parse_option, default=[], metavar="KEY=VALUE", help="method option (repeatable)"
    )
    p.add_argument(
        "--no-exact-match",
        action="store_true",
        help="skip greedy exact-match scoring (the chat probe generates anyway; --skip-probe chat)",
    )
    p.add_argument("--ppl", action="store_true", help="also score perplexity of targets")
    _add_probe_args(p)
    p.add_argument("--no-pre", action="store_true", help="skip scoring the unedited model on the edit set")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="results JSON path")
    p.add_argument("--save-state", default=None, help="directory to save the edited method state")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="resumable run: save state and progress here (a new or empty directory) every --checkpoint-every "
        "steps; the same command run again resumes after the last checkpoint; the checkpoint's own files are "
        "removed when the run completes, nothing else",
    )
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_run(args: argparse.Namespace) -> int:
    from lemoe.data import load_spec
    from lemoe.evaluation import Evaluator
    from lemoe.methods import build_method
    from lemoe.models import load_model
    from lemoe.runner import Protocol, RunCheckpoint, format_table, run_protocol, write_results

    protocol = Protocol(
        edits=args.edits,
        edits_per_step=args.edits_per_step,
        evaluate=args.evaluate,
        chunk=args.chunk,
        order=args.order,
        seed=args.seed,
    )
    command = getattr(args, "command_line", None)  # what reproduces this record
    progress: dict[str, Any] = {
        "status": "running",
        "command": command,
        "method": args.method,
        "steps": [],
        "timeline": [],
    }
    checkpoint = None
    if args.checkpoint:  # checked first: a directory of the user's files is refused before any work
        checkpoint = RunCheckpoint(
            Path(args.checkpoint),
            every=args.checkpoint_every,
            save_extra=lambda: {"steps": progress["steps"], "timeline": progress["timeline"]},
            restore_extra=progress.update,
        )
    requests, data_identity = load_spec(args.data, zsre_target=args.zsre_target)
    model, tokenizer = load_model(args.model, device=args.device)
    evaluator = Evaluator(  # before the method: a probe the tokenizer cannot serve is refused first
        model,
        tokenizer,
        batch_size=args.batch_size,
        exact_match=not args.no_exact_match,
        perplexity=args.ppl,
        probes=probes_from_args(args),
    )
    method = build_method(args.method, model, tokenizer, dict(args.opt))

    def keep(key: str) -> Callable[[dict[str, Any]], None]:
        # A long run keeps what it has measured in --out until the full record replaces it.
        def add(entry: dict[str, Any]) -> None:
            progress[key].append(entry)
            write_results(progress, args.out)

        return add

    record = run_protocol(
        method, requests, protocol, evaluator, evaluate_pre=not args.no_pre, progress=not args.quiet,
        on_step=keep("steps") if args.out else None, on_eval=keep("timeline") if args.out else None,
        checkpoint=checkpoint,
    )  # fmt: skip
    record["command"] = command
    record["data"] = {**data_identity, "zsre_target": args.zsre_target}
    record["model"]["name"] = args.model
    if args.out:
        write_results(record, args.out)
    if args.save_state:
        method.save_pretrained(args.save_state)
    if checkpoint is not None:  # the results (and state) are written: the run need never resume
        checkpoint.clear()
    print(format_table(record))
    if args.out:
        print(f"results written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.data = args.data or "zsre:sample"
    return cmd_run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """Re-score: a results file is re-printed; a saved state is loaded and evaluated on data."""
    from lemoe.runner import ResultsFormatError, format_table, read_results

    path = Path(args.path)
    if path.is_file():
        try:
            record = read_results(path)
        except ResultsFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if record.get("status") == "running":  # the partial file of a run still in progress
            done = sum(int(s["n"]) for s in record["steps"])
            print(f"{record['method']}: run in progress, {done} edits applied, {len(record['timeline'])} evaluation(s)")
            for t in record["timeline"]:
                scores = {k: round(v, 4) for k, v in t["aggregate"].items()}
                print(f"  after {t['edits_so_far']} edits: {json.dumps(scores)}")
            return 0
        print(format_table(record))
        return 0
    from lemoe.data import load_spec
    from lemoe.evaluation import Evaluator
    from lemoe.methods import load_method
    from lemoe.models import load_model

    requests, _ = load_spec(args.data, zsre_target=args.zsre_target)
    requests = requests[: args.edits] if args.edits else requests
    model, tokenizer = load_model(args.model, device=args.device)
    evaluator = Evaluator(
        model, tokenizer, batch_size=args.batch_size, exact_match=not args.no_exact_match, probes=probes_from_args(args)
    )
    reference = evaluator.reference(requests)  # before the state is applied: the unedited model
    method = load_method(str(path), model, tokenizer)
    result = evaluator.evaluate(requests, reference, method.forward_context)
    for key, value in result.aggregate.items():
        print(f"{key:32} {value:.4f}")
    return 0


def add_run_commands(sub: Any) -> None:
    """Add ``run``, ``demo`` and ``eval`` to the ``lemoe`` command line."""
    run = sub.add_parser("run", help="apply an edit stream under a protocol and evaluate", description=cmd_run.__doc__)
    _add_run_args(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        help=f"a short lifelong demo: {DEMO_EDITS} ZsRE edits on the offline default model",
        description="Runs LEMoE on 20 packaged ZsRE edits, one per step, and prints the results table.",
    )
    _add_run_args(demo)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="re-print a results JSON, or evaluate a saved method state on data")
    ev.add_argument("path", help="results JSON file or saved state directory")
    ev.add_argument("--model", default="smollm2-135m")
    ev.add_argument("--data", default="zsre:sample")
    ev.add_argument("--zsre-target", choices=["alt", "answer"], default="alt")
    ev.add_argument("--edits", type=int, default=None, help="score only the first N requests")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--no-exact-match", action="store_true")
    _add_probe_args(ev)
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=cmd_eval)
