"""``lemoe bench CONFIG``: run a benchmark matrix (methods × data × protocols × seeds), resumably."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_bench(args: argparse.Namespace) -> int:
    from lemoe.bench import BenchConfigError, load_bench
    from lemoe.bench.run import plan, run_bench

    try:
        bench = load_bench(args.config, out=args.out)
        plans = plan(bench, args.only)
    except BenchConfigError as e:
        print(f"lemoe bench: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for p in plans:
            print(f"{p.state:7} {p.cell.cell_id}\n        {p.command}")
        counts = {s: sum(p.state == s for p in plans) for s in ("todo", "resume", "done")}
        print(f"{len(plans)} cells: {counts['todo']} to run, {counts['resume']} to resume, {counts['done']} done")
        print(f"output folder: {bench.out}")
        return 0
    summary = run_bench(bench, args.only, progress=not args.quiet, executor=args.executor, address=args.address)
    print(f"{summary['cells']} cells, {summary['ran']} run now; aggregate: {summary['results']}")
    for cell_id, reason in summary["failed"].items():
        print(f"failed: {cell_id}: {reason} (rerun the same command to resume it)", file=sys.stderr)
    return 1 if summary["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.html (one offline file) and report.md from a bench folder's results.json."""
    from lemoe.bench.report import write_report

    paths = write_report(args.folder)
    print(f"report: {paths['html']} and {paths['markdown']}")
    return 0


def add_bench_command(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark matrix from a TOML file (resumable; writes results.json and samples.jsonl)",
        description=cmd_bench.__doc__,
    )
    p.add_argument("config", help="benchmark file (TOML; see lemoe.bench.config)")
    p.add_argument("--out", default=None, help="output folder (default: the file's `out`, relative to the file)")
    p.add_argument("--only", action="append", default=None, metavar="GLOB", help="run only cells whose id matches")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their state and commands; run nothing")
    p.add_argument("--quiet", action="store_true", help="no matrix progress bar")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: one cell after another (default); "
        "ray: cells as Ray tasks with the cpus/gpus each declares (pip install 'lemoe[ray]')",
    )
    p.add_argument("--address", default=None, help="--executor ray: join this Ray cluster (default: a local one)")
    p.set_defaults(func=cmd_bench)
    r = sub.add_parser("report", help="a results page (HTML + markdown, with plots) from a bench folder")
    r.add_argument("folder", help="a lemoe bench output folder (holding results.json)")
    r.set_defaults(func=cmd_report)
