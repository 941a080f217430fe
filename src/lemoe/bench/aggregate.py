"""The aggregate of a benchmark folder, in the spirit of lm-eval-harness's result files.

``results.json`` holds, per cell, its config and command, and every metric under a
``"<probe>,<scorer>"`` key (``"reliability,token_acc"``) with its standard error under
``"<probe>_stderr,<scorer>"``: the standard deviation of the mean over a seeded bootstrap of the
cell's edits (per-request values from the record; a metric with no per-edit values, e.g. the
control text's perplexity, has ``null``). The final timeline (metric against edits so far) and the
cost (seconds per edit, peak memory) come along for reports. ``samples.jsonl`` has one line per
scored probe of every cell's final evaluation (the record's ``samples``).
"""

from __future__ import annotations

import json
import math
import random
from typing import TYPE_CHECKING, Any

from lemoe import fileio

if TYPE_CHECKING:
    from lemoe.bench.config import Bench
    from lemoe.bench.run import CellPlan

AGGREGATE_VERSION = 1
BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0


def metric_key(key: str) -> tuple[str, str]:
    """``"reliability.token_acc"`` -> ``("reliability", "token_acc")``."""
    probe, _, scorer = key.rpartition(".")
    return (probe, scorer) if probe else (key, "none")


def bootstrap_stderr(values: list[float], *, resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> float | None:
    """Standard error of the mean by bootstrap over the values (None for fewer than two)."""
    clean = [v for v in values if v is not None and math.isfinite(v)]
    n = len(clean)
    if n < 2:
        return None
    rng = random.Random(seed)
    means = [sum(clean[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)]
    mu = sum(means) / resamples
    return math.sqrt(sum((m - mu) ** 2 for m in means) / (resamples - 1))


def cell_results(record: dict[str, Any]) -> dict[str, float | None]:
    """``"<probe>,<scorer>"`` values and ``"<probe>_stderr,<scorer>"`` bootstrap errors of a record."""
    per_request = record.get("per_request") or []
    out: dict[str, float | None] = {}
    for key, value in sorted(record.get("aggregate", {}).items()):
        probe, scorer = metric_key(key)
        values = [r[key] for r in per_request if key in r]
        out[f"{probe},{scorer}"] = value
        out[f"{probe}_stderr,{scorer}"] = bootstrap_stderr(values)
    return out


def write_aggregate(bench: Bench, done: list[CellPlan]) -> dict[str, str]:
    from lemoe.runner import read_results

    cells: dict[str, Any] = {}
    lines: list[str] = []
    for p in done:
        record = read_results(p.record)
        cells[p.cell.cell_id] = {
            "config": p.cell.describe(),
            "command": record.get("command"),
            "record": str(p.record.relative_to(bench.out)),
            "protocol": record.get("protocol"),
            "results": cell_results(record),
            "n_edits": len(record.get("per_request") or []),
            "timeline": [
                {"edits_so_far": t.get("edits_so_far"), "aggregate": t.get("aggregate", {})}
                for t in record.get("timeline", [])
            ],
            "cost": record.get("cost", {}),
            "model": record.get("model", {}),
        }
        for sample in record.get("samples") or []:
            lines.append(json.dumps({"cell": p.cell.cell_id, **sample}, ensure_ascii=False))
    doc = {
        "format_version": AGGREGATE_VERSION,
        "bench": str(bench.path),
        "stderr": f"bootstrap over edits, {BOOTSTRAP} resamples, seed {BOOTSTRAP_SEED}",
        "scorers": _scorers(done),
        "cells": cells,
    }
    results = fileio.write_json(bench.out / "results.json", doc)
    samples = fileio.write_text(bench.out / "samples.jsonl", "".join(line + "\n" for line in lines))
    return {"results": str(results), "samples": str(samples)}


def _scorers(done: list[CellPlan]) -> dict[str, str]:
    from lemoe.runner import read_results

    for p in done:
        scorers = read_results(p.record).get("scorers")
        if scorers:
            return dict(scorers)
    return {}
