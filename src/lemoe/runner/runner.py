"""Run a method through a lifelong protocol and produce a self-describing results record.

The runner caches the unedited model's locality answers before the first edit, optionally scores
the unedited model on the edit set (the "pre" row), applies the edit stream step by step, evaluates
on the protocol's schedule, and for chunked protocols resets the method in memory between chunks
(no reload from disk). The record holds everything needed to trust and reproduce a number, and
the final evaluations' generated texts (``outputs``), every probe they scored (``samples``: prompt,
scored answer, generated text, scores; see :data:`lemoe.evaluation.evaluator.SAMPLE_FIELDS`), global
numbers (``control.ppl``, averaged over the final evaluations in ``aggregate``) and skipped-probe
counts (``skipped_probes``).
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lemoe import fileio
from lemoe.evaluation import EvalResult, Evaluator, Reference
from lemoe.methods.base import EditMethod
from lemoe.requests import EditRequest
from lemoe.runner.checkpoint import RunCheckpoint, run_key
from lemoe.runner.protocol import Protocol

RESULTS_FORMAT_VERSION = 1  # of the results record; records without one are the format before it


class ResultsFormatError(ValueError):
    """A results file is not JSON, not a results record, or written by a newer lemoe."""


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def code_version() -> str | None:
    """The git commit of the lemoe source tree, when it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    import transformers

    from lemoe import __version__

    return {
        "lemoe": __version__,
        "code_version": code_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def _mean_aggregate(
    per_request: list[dict[str, float]], globals_: list[dict[str, float]] | None = None
) -> dict[str, float]:
    """Per-request scores averaged over requests, plus the final evaluations' global numbers
    (``control.ppl``) averaged over those evaluations (one per chunk, or per step when immediate)."""
    totals: dict[str, list[float]] = defaultdict(list)
    for r in [*per_request, *(globals_ or [])]:
        for k, v in r.items():
            totals[k].append(v)
    return {k: sum(v) / len(v) for k, v in sorted(totals.items())}


def run_protocol(
    method: EditMethod,
    requests: list[EditRequest],
    protocol: Protocol,
    evaluator: Evaluator,
    *,
    evaluate_pre: bool = True,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: RunCheckpoint | None = None,
) -> dict[str, Any]:
    """Apply ``protocol`` to ``method`` over ``requests``; return the results record (JSON-ready).

    ``on_step`` gets each edit step's log entry and ``on_eval`` each evaluation point's timeline
    entry as they happen (the CLI uses them to keep a partial results file during long runs).
    With ``checkpoint``, the run saves its state every ``checkpoint.every`` steps and, when the
    directory already holds this run's progress, resumes after the last saved step.
    """
    torch.manual_seed(protocol.seed)
    ordered = protocol.order_requests(requests)
    context = method.forward_context
    rss_start = _rss_mb()

    key = run_key(method, protocol, ordered) if checkpoint is not None else {}
    saved = checkpoint.load(key) if checkpoint is not None else None
    method.reset()  # the protocol starts from the unedited model, and so does the reference
    t0 = time.perf_counter()
    reference: Reference = evaluator.reference(ordered)
    pre_aggregate: dict[str, float] | None = None
    if saved is not None:
        pre_aggregate = saved["log"]["pre_edit"]
    elif evaluate_pre:
        pre_aggregate = evaluator.evaluate(ordered, reference).aggregate
    reference_seconds = time.perf_counter() - t0

    log = saved["log"] if saved is not None else {}
    final_scores: dict[str, dict[str, float]] = log.get("final_scores", {})
    # what the final evaluations said beyond per-request scores: generated texts, per-probe samples,
    # global numbers (control.ppl) and counts of skipped probes; saved with the scores so a resumed
    # run keeps them
    final_outputs: dict[str, dict[str, list[str]]] = log.get("final_outputs", {})
    final_samples: dict[str, list[dict[str, Any]]] = log.get("final_samples", {})
    final_globals: list[dict[str, float]] = log.get("final_globals", [])
    final_skipped: dict[str, int] = log.get("final_skipped", {})
    timeline: list[dict[str, Any]] = log.get("timeline", [])
    steps_log: list[dict[str, Any]] = log.get("steps", [])
    edit_seconds: float = log.get("edit_seconds", 0.0)
    eval_seconds: float = log.get("eval_seconds", 0.0)
    chunks = protocol.chunks(ordered)
    total_steps = sum(len(method.plan_batches(c, protocol.edits_per_step)) for c in chunks) if progress else 0
    bar = tqdm(total=total_steps, desc=f"{method.name} edits", disable=not progress, unit="step")
    bar.update(len(steps_log))

    def save_checkpoint(chunk_index: int, step: int, done: list[EditRequest]) -> None:
        so_far = {
            "pre_edit": pre_aggregate,
            "final_scores": final_scores,
            "final_outputs": final_outputs,
            "final_samples": final_samples,
            "final_globals": final_globals,
            "final_skipped": final_skipped,
            "timeline": timeline,
            "steps": steps_log,
            "edit_seconds": edit_seconds,
            "eval_seconds": eval_seconds,
        }
        position = {"chunk": chunk_index, "step": step, "done": [r.request_id for r in done]}
        checkpoint.save(method, key, position, so_far)  # type: ignore[union-attr]

    def keep_final(evaluated: list[EditRequest], res: EvalResult) -> None:
        for i, r in enumerate(evaluated):
            final_scores[r.request_id] = res.per_request[i]
            if res.outputs and res.outputs[i]:
                final_outputs[r.request_id] = res.outputs[i]
            final_samples[r.request_id] = []
        for sample in res.samples:
            final_samples[str(sample["request_id"])].append(sample)
        final_globals.append(res.globals)
        for kind, n in res.skipped.items():
            final_skipped[kind] = final_skipped.get(kind, 0) + n

    for chunk_index, chunk in enumerate(chunks):
        if saved is not None and chunk_index < saved["chunk"]:
            continue  # finished before the checkpoint; its scores are in final_scores
        method.reset()
        steps = method.plan_batches(chunk, protocol.edits_per_step)
        done: list[EditRequest] = []
        start_step = 0
        if saved is not None and chunk_index == saved["chunk"]:
            start_step = saved["step"]
            done = [r for step in steps[:start_step] for r in step]
            if [r.request_id for r in done] != saved["done"]:
                raise ValueError("checkpoint: the method planned this chunk's steps differently than before")
            assert checkpoint is not None  # saved comes from it
            checkpoint.restore(method, saved)
        for step_index, step in enumerate(steps):
            if step_index < start_step:
                continue
            report = method.apply(step)
            edit_seconds += report.seconds
            done.extend(step)
            entry = {
                "chunk": chunk_index,
                "step": step_index,
                "n": report.n_requests,
                "seconds": report.seconds,
                "info": report.info,
            }
            steps_log.append(entry)
            if on_step is not None:
                on_step(entry)
            bar.update(1)
            t1 = time.perf_counter()
            if protocol.evaluate == "immediate":
                keep_final(step, evaluator.evaluate(step, reference, context))
            elif protocol.every and (step_index + 1) % protocol.every == 0 and step_index + 1 < len(steps):
                res = evaluator.evaluate(done, reference, context)
                timeline.append(
                    {
                        "chunk": chunk_index,
                        "step": step_index + 1,
                        "edits_so_far": len(done),
                        "aggregate": res.aggregate,
                    }
                )
                if on_eval is not None:
                    on_eval(timeline[-1])
            eval_seconds += time.perf_counter() - t1
            if checkpoint is not None and (step_index + 1) % checkpoint.every == 0 and step_index + 1 < len(steps):
                save_checkpoint(chunk_index, step_index + 1, done)
        if protocol.evaluate != "immediate":
            t1 = time.perf_counter()
            res = evaluator.evaluate(chunk, reference, context)
            eval_seconds += time.perf_counter() - t1
            keep_final(chunk, res)
            timeline.append(
                {"chunk": chunk_index, "step": len(steps), "edits_so_far": len(chunk), "aggregate": res.aggregate}
            )
            if on_eval is not None:
                on_eval(timeline[-1])
        if checkpoint is not None:  # a finished chunk (or run) is never redone
            save_checkpoint(chunk_index + 1, 0, [])
    bar.close()

    per_request = [{"request_id": r.request_id, **final_scores[r.request_id]} for r in ordered]
    n_steps = len(steps_log)
    return {
        "method": {"name": method.name, "config": method.config.to_dict()},
        "protocol": protocol.to_dict(),
        "scorers": {
            "token_acc": "teacher-forced token accuracy of the answer after prompt + ' '",
            "exact_match": "greedy decoding, natural stop (EOS/newline/sentence end), normalised string equality",
            "agreement": "teacher-forced argmax unchanged versus the unedited model (cached before the first edit)",
            "generation_agreement": "greedy continuation unchanged versus the unedited model",
            "ppl": "perplexity of the answer given the prompt (control.ppl: of the packaged control text)",
            "contains": "free greedy generation (chat template, natural stop); the normalised answer occurs in it "
            "as whole words",
            "ngram_entropy": "ROME's fluency: (2/3 H2 + 4/3 H3) / 2, bigram/trigram entropy in bits of the words of "
            "a free greedy generation from the subject",
        },
        "model": method.base_fingerprint,
        "aggregate": _mean_aggregate(
            [{k: v for k, v in r.items() if k != "request_id"} for r in per_request], final_globals
        ),
        "pre_edit": pre_aggregate,
        "timeline": timeline,
        "per_request": per_request,
        "request_order": [r.request_id for r in ordered],
        "outputs": {r.request_id: final_outputs[r.request_id] for r in ordered if r.request_id in final_outputs},
        "samples": [sample for r in ordered for sample in final_samples.get(r.request_id, [])],
        "skipped_probes": final_skipped,
        "cost": {
            "edit_seconds": edit_seconds,
            "seconds_per_edit": edit_seconds / len(ordered),
            "seconds_per_step": edit_seconds / max(n_steps, 1),
            "eval_seconds": eval_seconds,
            "reference_seconds": reference_seconds,
            "peak_rss_mb": _peak_rss_mb(),
            "rss_growth_mb": _rss_mb() - rss_start,
        },
        "steps": steps_log,
        "resumed_from": {"chunk": saved["chunk"], "step": saved["step"]} if saved is not None else None,
        "seed": protocol.seed,
        "environment": environment(method.access.device),
    }


def write_results(record: dict[str, Any], path: str | Path) -> Path:
    """Write a results record durably, stamped with :data:`RESULTS_FORMAT_VERSION`; a value JSON
    cannot hold raises ``TypeError`` before anything is written (no silent stringification)."""
    return fileio.write_json(path, {"format_version": RESULTS_FORMAT_VERSION, **record})


def read_results(path: str | Path) -> dict[str, Any]:
    """Read a results record; refuse one that is not a record or comes from a newer format."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsFormatError(f"{path}: not a readable results file ({e})") from None
    if not isinstance(record, dict) or "method" not in record:
        raise ResultsFormatError(f"{path}: not a lemoe results record (no 'method')")
    version = record.get("format_version", 0)
    if not isinstance(version, int) or version > RESULTS_FORMAT_VERSION:
        raise ResultsFormatError(
            f"{path}: results format version {version!r}; this lemoe reads up to "
            f"{RESULTS_FORMAT_VERSION} (upgrade lemoe)"
        )
    return record


HEADLINE = [
    ("reliability.token_acc", "Rel"),
    ("generality.token_acc", "Gen"),
    ("locality.agreement", "Loc"),
    ("reliability.exact_match", "Rel EM"),
    ("generality.exact_match", "Gen EM"),
    ("locality.generation_agreement", "Loc gen"),
    ("locality.token_acc", "Loc abs"),
    ("locality_plus.agreement", "Loc+"),
    ("locality_plus_other.agreement", "Loc+o"),
    ("same_subject.agreement", "Subj"),
    ("chat_reliability.exact_match", "Chat EM"),
    ("chat_generality.exact_match", "ChatG EM"),
    ("fluency.ngram_entropy", "Entropy"),
    ("control.ppl", "Ctl ppl"),
]


def _cell(value: float) -> str:
    # a collapsed model's perplexity runs to millions: keep the column width
    return f"{value:9.3f}" if abs(value) < 1e5 else f"{value:9.2e}"


def format_table(record: dict[str, Any]) -> str:
    """A small results table: pre-edit and final rows with the protocol in the title."""
    p = record["protocol"]
    title = (
        f"{record['method']['name']} | {p['edits']} edits, {p['edits_per_step']} per step, "
        f"evaluate={p['evaluate']}" + (f", chunk={p['chunk']}" if p.get("chunk") else "")
    )
    cols = [(k, h) for k, h in HEADLINE if k in record["aggregate"]]
    header = f"{'':10}" + "".join(f"{h:>9}" for _, h in cols)
    lines = [title, header]
    if record.get("pre_edit"):
        lines.append(f"{'unedited':10}" + "".join(_cell(record["pre_edit"].get(k, float("nan"))) for k, _ in cols))
    lines.append(f"{'edited':10}" + "".join(_cell(record["aggregate"][k]) for k, _ in cols))
    c = record["cost"]
    lines.append(
        f"{c['seconds_per_edit']:.3f} s/edit, eval {c['eval_seconds']:.1f} s, peak RSS {c['peak_rss_mb']:.0f} MB"
    )
    lines.append("token_acc: teacher-forced; EM: greedy exact match; Loc: agreement with the unedited model")
    if any(k.startswith(("locality_plus", "same_subject", "chat_", "fluency", "control")) for k, _ in cols):
        lines.append(
            "Loc+/Loc+o: locality after the edit's own / another edit's statement; Subj: other facts of the "
            "subject; Chat EM: chat-template reply; Entropy: n-gram entropy of free text; Ctl ppl: control text"
        )
    return "\n".join(lines)
