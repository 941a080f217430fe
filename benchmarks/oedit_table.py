"""Markdown tables from the summaries written by ``benchmarks/oedit_compare.py``.

.venv/bin/python benchmarks/oedit_table.py docs/results/raw/oedit_summary.json
.venv/bin/python benchmarks/oedit_table.py --grid docs/results/raw/oedit_t*.json   # method x T, per dataset

``--grid`` keeps the rows run with each method's defaults (no variant label, no options) and puts
them side by side: one table per dataset, a row per method, a column per T, each cell
"Rel / Loc / Rel EM / held-out ppl". A (method, dataset, T) present in two files is an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    ("reliability.token_acc", "Rel"),
    ("generality.token_acc", "Gen"),
    ("locality.agreement", "Loc"),
    ("locality.token_acc", "Loc abs"),
    ("reliability.exact_match", "Rel EM"),
    ("generality.exact_match", "Gen EM"),
    ("locality.generation_agreement", "Loc gen"),
)


def fmt(value: object, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"  # type: ignore[str-format]


def ppl(value: float, digits: int) -> str:
    """Perplexity with ``digits`` decimals; a collapsed model's (≥ 1e5) in scientific notation."""
    return f"{value:.1e}" if value >= 1e5 else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ["dataset", "T", "method", *[h for _, h in COLUMNS], "knowns acc before→after", "ppl before→after"]
    head += ["cos succ. (mean / mean abs)", "s/edit", "state MB", "B_k+B_e rank / limit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["T"])):
        m, rb, ra = r["metrics"], r["retention_before"], r["retention_after"]
        cap = r.get("capacity")
        cap_text = "–" if not cap else ", ".join(f"{c['knowledge_rank']}+{c['edit_rank']} / {c['limit']}" for c in cap)
        cells = [r["dataset"], str(r["T"]), r["method"], *[fmt(m.get(k)) for k, _ in COLUMNS]]
        cells += [
            f"{rb['knowns.token_acc']:.3f}→{ra['knowns.token_acc']:.3f}",
            f"{ppl(rb['heldout.ppl'], 2)}→{ppl(ra['heldout.ppl'], 2)}",
            f"{fmt(r['cos_successive_mean'])} / {fmt(r['cos_successive_abs_mean'])}",
            f"{r['seconds_per_edit']:.2f}",
            f"{r['state_bytes'] / 1e6:.1f}",
            cap_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GRID_METHODS = ("oedit-plus", "oedit", "ft-m", "memit")


def grid(rows: list[dict]) -> str:
    """One table per dataset: methods down, T across, defaults-only rows."""
    cells: dict[tuple[str, str, int], dict] = {}
    for r in rows:
        if r["method"] not in GRID_METHODS or r["options"]:
            continue
        key = (r["dataset"], r["method"], r["T"])
        if key in cells:
            raise SystemExit(f"{key} appears twice in the inputs")
        cells[key] = r
    out = []
    for dataset in sorted({d for d, _, _ in cells}):
        ts = sorted({t for d, _, t in cells if d == dataset})
        ppl0 = next(r for k, r in cells.items() if k[0] == dataset)["retention_before"]["heldout.ppl"]
        out.append(f"**{dataset}** (cell: Rel / Loc / Rel EM / held-out ppl; ppl before any edit {ppl0:.1f})\n")
        out.append("| method | " + " | ".join(f"T = {t:,}" for t in ts) + " |")
        out.append("|---|" + "---|" * len(ts))
        for method in GRID_METHODS:
            row = [method]
            for t in ts:
                r = cells.get((dataset, method, t))
                if r is None:
                    row.append("–")
                    continue
                m = r["metrics"]
                row.append(
                    f"{fmt(m.get('reliability.token_acc'))} / {fmt(m.get('locality.agreement'))} / "
                    f"{fmt(m.get('reliability.exact_match'), 2)} / {ppl(r['retention_after']['heldout.ppl'], 0)}"
                )
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    args = sys.argv[1:]
    as_grid = "--grid" in args
    rows: list[dict] = []
    for path in (a for a in args if a != "--grid" and not a.endswith(".progress.json")):  # a run's sidecar
        rows.extend(json.loads(Path(path).read_text()))
    print(grid(rows) if as_grid else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
