"""Running a benchmark matrix cell by cell, resumably.

Layout of the output folder (everything under it is written by lemoe; nothing else is touched)::

    OUT/cells/<cell>.json        the cell's results record (``lemoe run --out``)
    OUT/checkpoints/<cell>/      its run checkpoint while it is unfinished (``lemoe run --checkpoint``)
    OUT/results.json             the aggregate (:mod:`lemoe.bench.aggregate`)
    OUT/samples.jsonl            per-probe samples of every cell

A cell whose record is complete and was made by the same command is skipped; an interrupted cell
(a partial record or a checkpoint) is resumed from its checkpoint; a complete record made by a
*different* command (the file was edited) is refused before anything runs, never overwritten.
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lemoe.bench.config import Bench, BenchConfigError, Cell


@dataclass(frozen=True)
class CellPlan:
    cell: Cell
    record: Path
    checkpoint: Path
    state: str  # todo | resume | done

    @property
    def command(self) -> str:
        return self.cell.command(self.record, self.checkpoint)


def _record_state(record: Path, checkpoint: Path, command: str) -> str:
    from lemoe.runner import ResultsFormatError, read_results

    if record.is_file():
        try:
            data = read_results(record)
        except ResultsFormatError:
            data = None
        if data is not None and data.get("status") != "running":
            if data.get("command") != command:
                raise BenchConfigError(
                    f"{record} holds a finished run of another command ({data.get('command')!r}); "
                    "move it away or change the cell's label to run this one"
                )
            return "done"
        return "resume"
    return "resume" if checkpoint.is_dir() and any(checkpoint.iterdir()) else "todo"


def plan(bench: Bench, only: list[str] | None = None) -> list[CellPlan]:
    """The cells to consider (filtered by ``only`` glob patterns on cell ids) and their state."""
    cells = [c for c in bench.cells if not only or any(fnmatch.fnmatch(c.cell_id, p) for p in only)]
    if only and not cells:
        raise BenchConfigError(f"--only {only} matches none of the {len(bench.cells)} cells")
    out = []
    for cell in cells:
        record = bench.out / "cells" / f"{cell.cell_id}.json"
        checkpoint = bench.out / "checkpoints" / cell.cell_id
        state = _record_state(record, checkpoint, cell.command(record, checkpoint))
        out.append(CellPlan(cell, record, checkpoint, state))
    return out


def run_cell_command(
    cell: Cell, record: Path, checkpoint: Path, *, write_to: Path | None = None, progress: bool = False
) -> int:
    """Run a cell in this process exactly as its ``lemoe run`` command would. The record's
    ``command`` names ``record``; ``write_to`` is where it is written (default: ``record``)."""
    from lemoe.cli.run import _add_run_args, cmd_run

    parser = argparse.ArgumentParser(prog="lemoe run")
    _add_run_args(parser)
    argv = cell.run_args(record, checkpoint)
    args = parser.parse_args(argv[1:])
    args.command_line = "lemoe " + shlex.join(argv)
    args.out = str(write_to or record)
    args.quiet = not progress
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    status = cmd_run(args)
    if status == 0 and checkpoint.is_dir() and not any(checkpoint.iterdir()):
        checkpoint.rmdir()  # the run removed its own files; the folder is the bench's
    return status


def run_cell(p: CellPlan, *, progress: bool = False) -> int:
    """Run one planned cell here (with its own progress bar when ``progress``: the second bar
    under the matrix's)."""
    return run_cell_command(p.cell, p.record, p.checkpoint, progress=progress)


def run_bench(
    bench: Bench,
    only: list[str] | None = None,
    *,
    progress: bool = True,
    execute: Callable[[CellPlan], int] | None = None,
    executor: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """Run every cell not yet done (in file order; with ``executor="ray"`` as Ray tasks, see
    :mod:`lemoe.bench.ray_executor`), then write the aggregate. Returns a summary."""
    from tqdm.auto import tqdm

    from lemoe.bench.aggregate import write_aggregate

    execute = execute or (lambda p: run_cell(p, progress=progress))
    plans = plan(bench, only)
    todo = [p for p in plans if p.state != "done"]
    failed: dict[str, str] = {}
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc="bench", unit="cell", disable=not progress)
    if executor == "ray":
        from lemoe.bench.ray_executor import run_on_ray
        from lemoe.runner import write_results

        def done_on_ray(p: CellPlan, record: dict[str, Any] | None, error: str | None) -> None:
            if record is not None:
                write_results(record, p.record)  # the driver writes: a record here is complete
            else:
                failed[p.cell.cell_id] = error or "failed"
            bar.update(1)

        run_on_ray(todo, address, done_on_ray)
    elif executor != "local":
        raise BenchConfigError(f"unknown executor {executor!r} (local or ray)")
    else:
        for p in todo:
            bar.set_postfix_str(p.cell.cell_id)
            try:
                status = execute(p)
            except Exception as e:  # one broken cell does not stop the matrix; its checkpoint stays
                status, reason = 1, f"{type(e).__name__}: {e}"
            else:
                reason = f"exit status {status}"
            if status != 0:
                failed[p.cell.cell_id] = reason
            bar.update(1)
    bar.close()
    all_cells = plan(bench)  # the aggregate covers every finished cell of the file
    done = [p for p in all_cells if p.state == "done"]
    paths = write_aggregate(bench, done)
    return {"cells": len(plans), "ran": len(todo) - len(failed), "failed": failed, **paths}
