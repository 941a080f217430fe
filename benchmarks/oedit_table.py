"""Markdown tables from the summaries written by ``benchmarks/oedit_compare.py``.

.venv/bin/python benchmarks/oedit_table.py docs/results/raw/oedit_summary.json
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
            f"{rb['heldout.ppl']:.2f}→{ra['heldout.ppl']:.2f}",
            f"{fmt(r['cos_successive_mean'])} / {fmt(r['cos_successive_abs_mean'])}",
            f"{r['seconds_per_edit']:.2f}",
            f"{r['state_bytes'] / 1e6:.1f}",
            cap_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    rows: list[dict] = []
    for path in sys.argv[1:]:
        rows.extend(json.loads(Path(path).read_text()))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
