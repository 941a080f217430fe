"""O-Edit / O-Edit+ versus FT-M and sequential MEMIT: lifelong editing, retention, update cosines, cost.

For each (method, dataset, T) it runs the lemoe protocol runner on SmolLM2-135M (or ``--model``)
and records, beside the runner's metrics (reliability / generality / locality, token accuracy and
exact match):

- retention of pre-existing knowledge, before and after the edits: teacher-forced token accuracy
  on held-out ROME knowns (``known_id % 5 == 2``, disjoint from the knowns O-Edit's B_k is built
  from) and perplexity of held-out text (``prompt + prediction`` of knowns with ``known_id % 5 == 3``);
- cosine similarity between successive updates (all MLP output projections, flattened), mean and
  mean absolute value over steps;
- seconds per edit (the runner's edit time), state size (``state.safetensors`` bytes).

T = 1 is WISE's protocol: ``--single N`` independent single edits (chunk=1) averaged; larger T is
one sequential run of T edits, one per step, final evaluation. Runs share one loaded model; each
method is reset (exactly) before the next run, which is checked.

Example (the exact commands behind docs/results/oedit.md are listed there)::

    nice -n 5 .venv/bin/python benchmarks/oedit_compare.py --methods oedit-plus,oedit,ft-m,memit \\
        --datasets zsre,counterfact --edits 1,10 --out docs/results/raw/oedit_small.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lemoe.data.loaders import load_requests, zsre_record
from lemoe.evaluation import Evaluator
from lemoe.evaluation.scorers import teacher_forced_predictions, token_accuracy
from lemoe.methods import build_method
from lemoe.models import load_model
from lemoe.models.access import ModelAccess
from lemoe.requests import EditRequest, InvalidRequestError, validate_request
from lemoe.runner import Protocol, RunCheckpoint, run_protocol
from lemoe.runner.runner import HEADLINE as RUNNER_HEADLINE
from lemoe.tokens import encode_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADLINE = tuple(key for key, _ in RUNNER_HEADLINE)  # the runner's headline metrics


def load_edits(dataset: str, data_dir: Path) -> tuple[list[EditRequest], dict[str, Any]]:
    """ZsRE dev (records with an empty ``alt`` are skipped and counted) or CounterFact val."""
    if dataset == "zsre":
        path = data_dir / "zsre" / "zsre_dev.json"
        out, skipped = [], 0
        for i, rec in enumerate(json.loads(path.read_text())):
            req = zsre_record(rec, "alt")
            try:
                validate_request(req, where=f"{path}[{i}]")
            except InvalidRequestError:
                skipped += 1
                continue
            out.append(req)
        return out, {"path": str(path), "target": "alt", "skipped_invalid": skipped}
    if dataset == "counterfact":
        path = data_dir / "counterfact" / "counterfact_val.json"
        return load_requests("counterfact", path), {"path": str(path)}
    raise SystemExit(f"unknown dataset {dataset!r}")


def retention_sets(data_dir: Path, n: int) -> tuple[list[tuple[str, str]], list[str]]:
    knowns = json.loads((data_dir / "knowns" / "known_1000.json").read_text())
    facts = [(k["prompt"], k["attribute"]) for k in knowns if k["known_id"] % 5 == 2][:n]
    texts = [k["prompt"] + k["prediction"] for k in knowns if k["known_id"] % 5 == 3][:n]
    return facts, texts


@torch.no_grad()
def retention(model: torch.nn.Module, tok: Any, facts: list[tuple[str, str]], texts: list[str]) -> dict[str, float]:
    """Knowns token accuracy (teacher-forced) and held-out text perplexity (token-weighted)."""
    pairs = encode_pairs(tok, [f[0] for f in facts], [f[1] for f in facts])
    argmax, _ = teacher_forced_predictions(model, tok, pairs, batch_size=32)
    acc = token_accuracy(argmax, pairs)
    nll_sum, n_tok = 0.0, 0
    for i in range(0, len(texts), 16):
        enc = tok(texts[i : i + 16], return_tensors="pt", padding=True).to(model.device)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        labels = enc.input_ids[:, 1:]
        mask = enc.attention_mask[:, 1:].bool()
        nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        nll_sum += float(nll[mask].sum())
        n_tok += int(mask.sum())
    return {"knowns.token_acc": sum(acc) / len(acc), "heldout.ppl": math.exp(nll_sum / n_tok)}


class Progress:
    """Every ``every`` steps, writes where a long run is (steps, seconds per edit) to a sidecar file.

    A run cut by a time limit then still says how far it got and at what cost; the sidecar is
    removed when the run's row lands in the summary.
    """

    def __init__(self, path: Path, label: dict[str, Any], total: int, every: int = 25) -> None:
        self.path, self.label, self.total, self.every = path, label, total, every
        self.start = time.perf_counter()
        self.steps = 0
        self.edit_seconds = 0.0

    def __call__(self, entry: dict[str, Any]) -> None:
        self.steps += 1
        self.edit_seconds += entry["seconds"]
        if self.steps % self.every and self.steps != self.total:
            return
        info = {
            **self.label,
            "steps_done": self.steps,
            "steps_total": self.total,
            "elapsed_seconds": time.perf_counter() - self.start,  # since this process began the run
            "edit_seconds_per_step": self.edit_seconds / self.steps,  # editing only, as in the summary
        }
        self.path.write_text(json.dumps(info, indent=1))

    def resume(self, steps: int, edit_seconds: float) -> None:
        """Continue counting after a checkpoint (elapsed time restarts at the resume)."""
        self.steps, self.edit_seconds = steps, edit_seconds

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


class UpdateCosines:
    """Cosine between successive updates of all MLP output projections (any weight-editing method)."""

    def __init__(self, access: ModelAccess) -> None:
        self.weights = [m.out_proj.weight for m in access.mlps]
        self.prev_w = [w.detach().clone() for w in self.weights]
        self.prev_delta: torch.Tensor | None = None
        self.cosines: list[float] = []

    def __call__(self, _entry: dict[str, Any]) -> None:
        now = [w.detach().clone() for w in self.weights]
        delta = torch.cat([(a - b).flatten() for a, b in zip(now, self.prev_w, strict=True)])
        if self.prev_delta is not None and float(delta.norm()) > 0 and float(self.prev_delta.norm()) > 0:
            self.cosines.append(float(torch.nn.functional.cosine_similarity(delta, self.prev_delta, dim=0)))
        self.prev_delta, self.prev_w = delta, now

    def reset_chain(self) -> None:
        self.prev_delta = None

    def resume(self, cosines: list[float]) -> None:
        """Continue after a checkpoint: the cosine across the resume point is not measured."""
        self.cosines = list(cosines)
        self.prev_w = [w.detach().clone() for w in self.weights]
        self.prev_delta = None


def _resume(extra: dict[str, Any], cos: UpdateCosines, where: Progress) -> None:
    cos.resume(extra["cosines"])
    where.resume(extra["steps"], extra.get("edit_seconds", 0.0))


def weights_checksum(access: ModelAccess) -> float:
    return float(sum(m.out_proj.weight.double().sum() for m in access.mlps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="oedit-plus,oedit,ft-m,memit")
    p.add_argument("--datasets", default="zsre,counterfact")
    p.add_argument("--edits", default="1,10", help="T values; 1 means --single independent single edits")
    p.add_argument("--single", type=int, default=20, help="how many independent single edits for T=1")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="method option; METHOD may carry a variant label, e.g. --methods oedit-plus#final "
        "--opt oedit-plus#final:hard_when=final",
    )
    p.add_argument("--label", default="", help="suffix for the method name in the summary (ablations)")
    p.add_argument("--retention-n", type=int, default=100)
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--no-exact-match", action="store_true")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    p.add_argument("--out", required=True, help="summary JSON (appended to if it exists)")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="resumable runs: each (method, dataset, T) run saves its state here every --checkpoint-every "
        "steps; the same command run again resumes an unfinished run and skips rows already in --out",
    )
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    args = p.parse_args(argv)

    data_dir = Path(args.data_dir)
    options: dict[str, dict[str, Any]] = {}
    for text in args.opt:
        name, _, kv = text.partition(":")
        key, _, value = kv.partition("=")
        try:
            options.setdefault(name, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            options.setdefault(name, {})[key] = value

    model, tok = load_model(args.model, device=args.device)
    access = ModelAccess(model)
    checksum = weights_checksum(access)
    facts, texts = retention_sets(data_dir, args.retention_n)
    t0 = time.perf_counter()
    before = retention(model, tok, facts, texts)
    print(f"retention before: {before} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out_path = Path(args.out)
    summary: list[dict[str, Any]] = json.loads(out_path.read_text()) if out_path.exists() else []
    evaluator = Evaluator(model, tok, exact_match=not args.no_exact_match)

    for dataset in args.datasets.split(","):
        requests, data_identity = load_edits(dataset, data_dir)
        for t in [int(x) for x in args.edits.split(",")]:
            single = Protocol(edits=args.single, edits_per_step=1, chunk=1)
            protocol = single if t == 1 else Protocol(edits=t, edits_per_step=1)
            for name in args.methods.split(","):
                opts = options.get(name, {})
                if args.checkpoint_dir and any(
                    r["method"] == name + args.label and r["dataset"] == dataset and r["T"] == t for r in summary
                ):
                    print(f"{name + args.label} {dataset} T={t}: already in {out_path}, skipped", flush=True)
                    continue
                start = time.perf_counter()
                method = build_method(name.partition("#")[0], model, tok, dict(opts))
                # one-time preparation (O-Edit's B_k, MEMIT's statistics) is setup, not per-edit cost
                prepare = getattr(method, "ensure_knowledge", None) or getattr(method, "prepare", None)
                if prepare is not None:
                    prepare()
                setup = time.perf_counter() - start
                cos = UpdateCosines(access)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                where = Progress(
                    out_path.with_suffix(".progress.json"),
                    {"method": name + args.label, "dataset": dataset, "T": t},
                    total=math.ceil(protocol.edits / protocol.edits_per_step),
                )

                def on_step(entry: dict[str, Any], cos: UpdateCosines = cos, where: Progress = where) -> None:
                    cos(entry)
                    where(entry)

                checkpoint = None
                if args.checkpoint_dir:
                    checkpoint = RunCheckpoint(
                        Path(args.checkpoint_dir) / f"{name + args.label}-{dataset}-T{t}".replace(" ", "_"),
                        every=args.checkpoint_every,
                        save_extra=lambda cos=cos, where=where: {
                            "cosines": cos.cosines,
                            "steps": where.steps,
                            "edit_seconds": where.edit_seconds,
                        },
                        restore_extra=lambda extra, cos=cos, where=where: _resume(extra, cos, where),
                    )
                record = run_protocol(
                    method, requests, protocol, evaluator, progress=False, on_step=on_step, checkpoint=checkpoint
                )
                after = retention(model, tok, facts, texts)
                with tempfile.TemporaryDirectory() as tmp:
                    method.save_pretrained(tmp)
                    state_bytes = (Path(tmp) / "state.safetensors").stat().st_size
                capacity = method.capacity() if hasattr(method, "capacity") else None
                cosines = cos.cosines if t > 1 else []  # T=1 chunks are independent edits
                row = {
                    "method": name + args.label,
                    "options": opts,
                    "dataset": dataset,
                    "data": data_identity,
                    "T": t,
                    "protocol": protocol.to_dict(),
                    "model": args.model,
                    "metrics": {k: record["aggregate"].get(k) for k in HEADLINE},
                    "pre_edit": {k: (record["pre_edit"] or {}).get(k) for k in HEADLINE},
                    "retention_before": before,
                    "retention_after": after,
                    "retention_note": "after = model after the last chunk" if t == 1 else "after all T edits",
                    "cos_successive_mean": sum(cosines) / len(cosines) if cosines else None,
                    "cos_successive_abs_mean": sum(abs(c) for c in cosines) / len(cosines) if cosines else None,
                    "seconds_per_edit": record["cost"]["seconds_per_edit"],
                    "setup_seconds": setup,
                    "eval_seconds": record["cost"]["eval_seconds"],
                    "state_bytes": state_bytes,
                    "capacity": capacity,
                    "command": "python " + " ".join(sys.argv),
                    "code_version": record["environment"]["code_version"],
                    "threads": record["environment"]["threads"],
                }
                if record["resumed_from"] is not None:
                    row["resumed_from"] = record["resumed_from"]
                summary.append(row)
                out_path.write_text(json.dumps(summary, indent=1))
                where.done()
                if checkpoint is not None:
                    checkpoint.clear()
                m = row["metrics"]
                print(
                    f"{name + args.label:14} {dataset:11} T={t:<4} rel {m['reliability.token_acc']:.3f} "
                    f"gen {m['generality.token_acc']:.3f} loc {m['locality.agreement']:.3f} "
                    f"relEM {m['reliability.exact_match']} "
                    f"knowns {after['knowns.token_acc']:.3f} ppl {after['heldout.ppl']:.2f} "
                    f"cos {row['cos_successive_mean']} s/edit {row['seconds_per_edit']:.2f} "
                    f"state {state_bytes / 1e6:.1f} MB",
                    flush=True,
                )
                method.reset()
                if abs(weights_checksum(access) - checksum) > 1e-6 * max(abs(checksum), 1.0):
                    raise SystemExit(f"{name}: reset() did not restore the MLP weights; aborting")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
