"""Print a markdown table of the realistic-probe metrics from results records (``lemoe run --out``).

    python benchmarks/probe_table.py docs/results/raw/lemoe_cfval200_b10_probes.json ...

One row per record (edited model) and, where the record has it, one for the unedited model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lemoe.runner import read_results

COLUMNS = [
    ("reliability.token_acc", "Rel"),
    ("reliability.exact_match", "Rel EM"),
    ("generality.token_acc", "Gen"),
    ("generality.exact_match", "Gen EM"),
    ("locality.agreement", "Loc"),
    ("locality_plus.agreement", "Loc+"),
    ("locality_plus_other.agreement", "Loc+o"),
    ("same_subject.agreement", "Subj"),
    ("chat_reliability.exact_match", "Chat EM"),
    ("chat_generality.exact_match", "ChatG EM"),
    ("chat_reliability.contains", "Chat has"),
    ("fluency.ngram_entropy", "Entropy"),
    ("control.ppl", "Ctl ppl"),
]


def row(label: str, values: dict[str, float]) -> str:
    cells = [f"{values[k]:.3f}" if k in values else "—" for k, _ in COLUMNS]
    return f"| {label} | " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    print("| run | " + " | ".join(h for _, h in COLUMNS) + " | s/edit |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for path in paths:
        record = read_results(path)
        p = record["protocol"]
        name = f"{record['method']['name']} {Path(path).stem} ({p['edits']} edits, {p['edits_per_step']}/step)"
        if record.get("pre_edit"):
            print(row(f"unedited, {Path(path).stem}", record["pre_edit"]) + " — |")
        print(row(name, record["aggregate"]) + f" {record['cost']['seconds_per_edit']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
