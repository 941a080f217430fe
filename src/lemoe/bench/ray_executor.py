"""``lemoe bench --executor ray``: cells as Ray tasks, on this machine or on a cluster (``--address``).

Each cell is a task that asks for the cell's ``cpus`` / ``gpus``. The worker runs the cell's
``lemoe run`` with a private output file and returns the record; the *driver* writes it under
``OUT/cells/``, so a record in the output folder is always complete. A worker that dies (killed,
out of memory, its node lost) makes Ray run the task again (``max_retries``); the new attempt
resumes from the cell's checkpoint in ``OUT/checkpoints/`` when that folder is shared with the
worker (always on one machine), else it starts the cell over. Only that cell is repeated. Ray is
an optional extra (``pip install 'lemoe[ray]'``); the default executor needs none of it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lemoe.bench.config import Cell

MAX_RETRIES = 3  # attempts after a lost worker, per cell


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError("--executor ray needs Ray: pip install 'lemoe[ray]'") from e
    return ray


def run_cell_returning_record(cell: Cell, record: str, checkpoint: str) -> dict[str, Any]:
    """In a worker: run the cell (its command names ``record``; the file written is private, the
    driver writes ``record``). No progress bars: workers' output does not reach the driver."""
    import json

    from lemoe.bench.run import run_cell_command

    with tempfile.TemporaryDirectory(prefix="lemoe-cell-") as tmp:
        private = Path(tmp) / "record.json"
        status = run_cell_command(cell, Path(record), Path(checkpoint), write_to=private)
        if status != 0:
            raise RuntimeError(f"lemoe run exited with status {status}")
        return json.loads(private.read_text(encoding="utf-8"))


def run_on_ray(
    plans: list[Any], address: str | None, on_done: Callable[[Any, dict[str, Any] | None, str | None], None]
) -> None:
    """Run ``plans`` (CellPlan) as Ray tasks; ``on_done(plan, record, error)`` in the driver."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(run_cell_returning_record)
        refs = {
            task.options(
                num_cpus=p.cell.cpus, num_gpus=p.cell.gpus, max_retries=MAX_RETRIES, name=p.cell.cell_id
            ).remote(p.cell, str(p.record), str(p.checkpoint)): p
            for p in plans
        }
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            p = refs[ready[0]]
            try:
                on_done(p, ray.get(ready[0]), None)
            except ray.exceptions.RayError as e:
                on_done(p, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        if started:
            ray.shutdown()
