"""``lemoe report FOLDER``: a results page from a benchmark folder's ``results.json``.

Two files next to it: ``report.html`` (one file, plots embedded as PNG data, opens offline, no
script) and ``report.md`` (the same tables, plots under ``report_files/``). For each protocol (data,
stream length, edits per step, evaluation schedule) a leaderboard of methods with 95 % intervals
(± 1.96 bootstrap standard errors over edits), curves of Rel/Gen/Loc against edits so far, and for
each data set the cost (seconds per edit, peak memory) against the stream length; at the end the
exact command and config of every cell.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from lemoe import fileio

# (probe, scorer) columns of the leaderboard, in order, with their headers
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("reliability", "token_acc", "Rel"),
    ("reliability", "exact_match", "Rel EM"),
    ("generality", "token_acc", "Gen"),
    ("generality", "exact_match", "Gen EM"),
    ("locality", "agreement", "Loc"),
    ("locality_plus", "agreement", "Loc+"),
    ("same_subject", "agreement", "Subj"),
    ("chat_reliability", "exact_match", "Chat EM"),
)
CURVES = (("reliability", "token_acc", "Rel"), ("generality", "token_acc", "Gen"), ("locality", "agreement", "Loc"))


def _group(cell: dict[str, Any]) -> tuple[str, int, int, str]:
    c = cell["config"]
    return (c.get("data_label", c["data"]), c["edits"], c["edits_per_step"], c["eval"])


def _fmt(value: float | None, se: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {1.96 * se:.3f}"


def leaderboards(cells: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per protocol: a title, the header and one row per cell (method label, seed)."""
    groups: dict[tuple, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for cell_id, cell in cells.items():
        groups[_group(cell)].append((cell_id, cell))
    out = []
    for (data, n, b, ev), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        present = [c for c in COLUMNS if any(f"{c[0]},{c[1]}" in m[1]["results"] for m in members)]
        header = ["method", "seed", *[c[2] for c in present], "s/edit", "peak RSS MB"]
        rows = []
        for _, cell in sorted(members, key=lambda m: (m[1]["config"].get("method_label", ""), m[1]["config"]["seed"])):
            res, cost = cell["results"], cell.get("cost", {})
            row = [cell["config"].get("method_label", cell["config"]["method"]), str(cell["config"]["seed"])]
            row += [_fmt(res.get(f"{p},{s}"), res.get(f"{p}_stderr,{s}")) for p, s, _ in present]
            row += [_num(cost.get("seconds_per_edit"), 2), _num(cost.get("peak_rss_mb"), 0)]
            rows.append(row)
        out.append((f"{data}: {n} edits, {b} per step, eval {ev}", header, rows))
    return out


def _num(value: Any, digits: int) -> str:
    return "–" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plots(cells: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(title, PNG) of the curves per protocol and the cost per data set."""
    import matplotlib

    matplotlib.use("Agg")  # no display; the report is files
    import matplotlib.pyplot as plt

    figures: list[tuple[str, bytes]] = []
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells.values():
        groups[_group(cell)].append(cell)
    for (data, n, b, ev), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.3), squeeze=False, layout="constrained")
        for ax, (probe, scorer, name) in zip(axes[0], CURVES, strict=True):
            for cell in members:
                points = [
                    (t["edits_so_far"], t["aggregate"][f"{probe}.{scorer}"])
                    for t in cell["timeline"]
                    if f"{probe}.{scorer}" in t.get("aggregate", {}) and t.get("edits_so_far") is not None
                ]
                if points:
                    label = f"{cell['config'].get('method_label', cell['config']['method'])} s{cell['config']['seed']}"
                    ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
            ax.set_title(f"{name} ({scorer})")
            ax.set_xlabel("edits so far")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{data}: {n} edits, {b} per step, eval {ev}")
        figures.append((f"curves: {data}, {n} edits, {b}/step, {ev}", _figure_png(fig)))
        plt.close(fig)
    by_data: dict[str, dict[str, list[tuple[int, float, float]]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells.values():
        c, cost = cell["config"], cell.get("cost", {})
        if isinstance(cost.get("seconds_per_edit"), int | float):
            key = f"{c.get('method_label', c['method'])}, {c['edits_per_step']}/step"
            by_data[c.get("data_label", c["data"])][key].append(
                (c["edits"], cost["seconds_per_edit"], cost.get("peak_rss_mb") or float("nan"))
            )
    for data, lines in sorted(by_data.items()):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3), layout="constrained")
        for label, points in sorted(lines.items()):
            points.sort()
            xs = [p[0] for p in points]
            left.plot(xs, [p[1] for p in points], marker="o", label=label)
            right.plot(xs, [p[2] for p in points], marker="o", label=label)
        left.set(title="seconds per edit", xlabel="stream length (edits)")
        right.set(title="peak RSS (MB)", xlabel="stream length (edits)")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        left.legend(fontsize=8)
        figures.append((f"cost: {data}", _figure_png(fig)))
        plt.close(fig)
    return figures


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
    "code{font-size:85%;word-break:break-all}img{max-width:100%}"
)


def write_report(folder: str | Path) -> dict[str, Path]:
    """Write ``report.html`` and ``report.md`` (and ``report_files/``) from ``results.json``."""
    folder = Path(folder)
    path = folder / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cells: dict[str, Any] = doc["cells"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a lemoe bench results file ({e}); run `lemoe bench` first") from None
    if not cells:
        raise ValueError(f"{path}: no finished cells yet")
    boards = leaderboards(cells)
    figures = plots(cells)
    intro = (
        f"{len(cells)} cells from `{doc.get('bench')}`. Intervals: ± 1.96 standard errors ({doc.get('stderr')}). "
        "Scorers: " + "; ".join(f"{k}: {v}" for k, v in doc.get("scorers", {}).items())
    )
    md = ["# lemoe benchmark report", "", intro, ""]
    body = [f"<h1>lemoe benchmark report</h1><p>{html.escape(intro)}</p>"]
    for title, header, rows in boards:
        md += [f"## {title}", "", _md_table(header, rows), ""]
        body.append(f"<h2>{html.escape(title)}</h2>{_html_table(header, rows)}")
    files = folder / "report_files"
    files.mkdir(exist_ok=True)
    md += ["## Plots", ""]
    body.append("<h2>Plots</h2>")
    for i, (title, png) in enumerate(figures):
        name = f"plot-{i}.png"
        fileio.write_bytes(files / name, png)
        md += [f"![{title}](report_files/{name})", ""]
        data = base64.b64encode(png).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>')
    md += ["## Cells", ""]
    body.append("<h2>Cells</h2>")
    for cell_id, cell in sorted(cells.items()):
        config = json.dumps(cell["config"], sort_keys=True)
        md += [f"- `{cell_id}`: `{cell['command']}`", f"  config: `{config}`"]
        body.append(
            f"<p><b>{html.escape(cell_id)}</b><br><code>{html.escape(str(cell['command']))}</code>"
            f"<br><code>{html.escape(config)}</code></p>"
        )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>lemoe benchmark report</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return {
        "html": fileio.write_text(folder / "report.html", page),
        "markdown": fileio.write_text(folder / "report.md", "\n".join(md) + "\n"),
    }
