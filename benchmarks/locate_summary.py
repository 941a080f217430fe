"""Summarise `lemoe run` results files of the locate-then-edit methods into a Markdown table.

Usage: python benchmarks/locate_summary.py RESULT.json [...] [--json docs/results/raw/locate_summary.json]

For each file: the protocol, every evaluation point of the timeline (edits so far, Rel/Gen/Loc with
their scorers), seconds per edit, the one-off statistics time versus the mean time per batch
(excluding the statistics), and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = [
    ("reliability.token_acc", "Rel"),
    ("generality.token_acc", "Gen"),
    ("locality.agreement", "Loc"),
    ("locality.token_acc", "Loc abs"),
    ("reliability.exact_match", "Rel EM"),
    ("generality.exact_match", "Gen EM"),
    ("locality.generation_agreement", "Loc gen"),
]


def label(record: dict[str, Any]) -> str:
    """The method's name, marked where a run is MEMIT-MASS or an ablation (options off their default)."""
    name = record["method"]["name"]
    p, options = record["protocol"], record["method"]["config"]
    if name == "memit" and p["edits_per_step"] >= p["edits"]:
        name = "memit-MASS"
    if options.get("scope_rule") is False:
        name += " (no scope rule)"
    if options.get("alpha_floor") is not None:
        name += f" (α floor {options['alpha_floor']})"
    if options.get("scope_score", "zscore") != "zscore":
        name += f" ({options['scope_score']}"
        name += f", Q {options['alpha_quantile']}" if options.get("alpha_quantile") else ""
        name += ", prompt keys)" if options.get("scope_prompt_keys") else ")"
    elif options.get("alpha_quantile"):
        name += f" (Q {options['alpha_quantile']})"
    if name.startswith("memit") and options.get("mom2_weight") is not None:
        name += f" (λ {options['mom2_weight']:g})"
    return name


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    steps = record["steps"]
    stats = sum(float(s["info"].get("stats_seconds", 0.0)) for s in steps)
    batch = [float(s["seconds"]) for s in steps]
    per_batch = (sum(batch) - stats) / max(len(batch), 1)
    return {
        "method": label(record),
        "options": {k: v for k, v in record["method"]["config"].items() if v is not None},
        "protocol": record["protocol"],
        "data": record.get("data", {}),
        "model": record["model"].get("name", record["model"].get("model_type")),
        "pre_edit": record.get("pre_edit"),
        "timeline": [{"edits_so_far": t["edits_so_far"], **t["aggregate"]} for t in record["timeline"]],
        "seconds_per_edit": record["cost"]["seconds_per_edit"],
        "stats_seconds_once": stats,
        "seconds_per_batch_excluding_stats": per_batch,
        "z_seconds_per_batch": sum(float(s["info"].get("z_seconds", 0.0)) for s in steps) / max(len(steps), 1),
        "eval_seconds": record["cost"]["eval_seconds"],
        "peak_rss_mb": record["cost"]["peak_rss_mb"],
        "final_alpha": steps[-1]["info"].get("alpha"),
        "code_version": record["environment"].get("code_version"),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| method | batch | edits so far | " + " | ".join(h for _, h in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for r in rows:
        for t in r["timeline"]:
            cells = " | ".join(f"{t[k]:.3f}" if k in t else "–" for k, _ in COLUMNS)
            lines.append(f"| {r['method']} | {r['protocol']['edits_per_step']} | {t['edits_so_far']} | {cells} |")
    lines.append("")
    lines.append("| method | batch | s/edit | statistics (once) s | s/batch (excl. stats) | z s/batch | peak RSS MB |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['protocol']['edits_per_step']} | {r['seconds_per_edit']:.2f} | "
            f"{r['stats_seconds_once']:.1f} | {r['seconds_per_batch_excluding_stats']:.0f} | "
            f"{r['z_seconds_per_batch']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--json", default=None, help="write the summaries (small) to this file")
    args = parser.parse_args()
    rows = [summarise(json.loads(Path(p).read_text())) for p in args.results]
    print(markdown(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
