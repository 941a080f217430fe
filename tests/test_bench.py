"""``lemoe bench``: the matrix file is checked before anything runs; cells run, skip and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lemoe.bench import BenchConfigError, load_bench
from lemoe.bench.aggregate import bootstrap_stderr, cell_results
from lemoe.bench.run import plan, run_bench, run_cell
from lemoe.cli import main

MATRIX = """
model = "{model}"
out = "out"
[[method]]
name = "ft-m"
options = {{ steps = 2 }}
[[method]]
name = "lemoe"
options = {{ steps = 3, train_chat = false, layer = 1 }}
[[data]]
spec = "zsre:sample"
edits = [4]
[[protocol]]
edits_per_step = 2
eval = "final"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bench.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "ft-m"', 'name = "ft-x"'), r"\[\[method\]\] #1: unknown method 'ft-x'"),
        (("steps = 2", "stpes = 2"), r"\[\[method\]\] #1.options: .*unknown option\(s\) \['stpes'\]"),
        (('spec = "zsre:sample"', 'spec = "wiki:sample"'), r"\[\[data\]\] #1.spec: unknown data kind 'wiki'"),
        (('spec = "zsre:sample"', 'spec = "zsre:missing.json"'), r"\[\[data\]\] #1.spec: no data file .*missing.json"),
        (('eval = "final"', 'eval = "every:0"'), r"\[\[protocol\]\] #1: evaluate must be"),
        (("edits = [4]", "edits = [0]"), r"\[\[data\]\] #1.edits: expected a positive integer"),
        (('out = "out"', 'out = "out"\nbogus = 1'), r"unknown key\(s\) \['bogus'\]"),
        (('name = "ft-m"', 'name = "ft-m"\ngpus = -1'), r"\[\[method\]\] #1.gpus: expected a number >= 0"),
        (("[[protocol]]", "[[protocol]"), r"not valid TOML: .*line"),
        (
            ("[[protocol]]", '[[data]]\nspec = "zsre:sample"\nedits = [4]\n[[protocol]]'),
            r"two cells would write ft-m\.zsre-sample\.n4\.b2\.final\.s0\.json",
        ),
    ],
)
def test_a_bad_file_is_refused_with_its_place_before_anything_runs(tmp_path: Path, change, message) -> None:
    path = write(tmp_path, MATRIX.format(model="m").replace(*change))
    with pytest.raises(BenchConfigError, match=message):
        load_bench(path)
    assert main(["bench", str(path), "--dry-run"]) == 2
    assert not (tmp_path / "out").exists()


def test_cells_and_their_commands(tmp_path: Path, capsys) -> None:
    bench = load_bench(write(tmp_path, MATRIX.format(model="m").replace("edits = [4]", "edits = [4, 6]")))
    ids = [c.cell_id for c in bench.cells]
    assert ids == [
        "ft-m.zsre-sample.n4.b2.final.s0",
        "ft-m.zsre-sample.n6.b2.final.s0",
        "lemoe.zsre-sample.n4.b2.final.s0",
        "lemoe.zsre-sample.n6.b2.final.s0",
    ]
    assert bench.out == tmp_path / "out"  # relative to the file, not the working directory
    p = plan(bench, ["lemoe.*n6*"])
    assert [x.cell.cell_id for x in p] == ["lemoe.zsre-sample.n6.b2.final.s0"] and p[0].state == "todo"
    assert "--opt steps=3 --opt train_chat=false --opt layer=1" in p[0].command
    assert "--quiet" not in p[0].command  # progress bars are the runner's choice, not the cell's
    with pytest.raises(BenchConfigError, match="matches none"):
        plan(bench, ["nothing*"])
    assert main(["bench", str(bench.path), "--dry-run"]) == 0
    assert "4 cells: 4 to run, 0 to resume, 0 done" in capsys.readouterr().out


def test_bootstrap_stderr_is_seeded_and_sensible() -> None:
    values = [float(i % 2) for i in range(100)]
    se = bootstrap_stderr(values)
    assert se == bootstrap_stderr(values) and 0.03 < se < 0.07  # analytic: 0.5 / sqrt(100) = 0.05
    assert bootstrap_stderr([1.0]) is None
    record = {
        "aggregate": {"reliability.token_acc": 0.5},
        "per_request": [{"reliability.token_acc": v} for v in values],
    }
    assert cell_results(record) == {"reliability,token_acc": 0.5, "reliability_stderr,token_acc": se}


def test_a_matrix_runs_skips_finished_cells_and_resumes_interrupted_ones(tmp_path: Path, tiny_model_dir: Path) -> None:
    bench = load_bench(write(tmp_path, MATRIX.format(model=tiny_model_dir)))
    summary = run_bench(bench, progress=False)
    assert summary["failed"] == {} and summary["ran"] == 2
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = results["cells"]
    assert sorted(cells) == ["ft-m.zsre-sample.n4.b2.final.s0", "lemoe.zsre-sample.n4.b2.final.s0"]
    for cell_id, cell in cells.items():
        record = json.loads((tmp_path / "out" / "cells" / f"{cell_id}.json").read_text())
        assert cell["command"] == record["command"] == plan(bench, [cell_id])[0].command
        assert cell["results"]["reliability,token_acc"] == record["aggregate"]["reliability.token_acc"]
        assert "reliability_stderr,token_acc" in cell["results"] and cell["n_edits"] == 4
        assert cell["config"]["method"] in ("ft-m", "lemoe") and cell["cost"]["seconds_per_edit"] > 0
    assert not (tmp_path / "out" / "checkpoints" / "ft-m.zsre-sample.n4.b2.final.s0").exists()
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {s["cell"] for s in samples} == set(cells)
    assert {s["probe"] for s in samples} >= {"reliability", "generality", "locality"}
    assert all(s["prompt"] and isinstance(s["scores"], dict) for s in samples)

    ran: list[str] = []

    def spy(p) -> int:
        ran.append(p.cell.cell_id)
        return run_cell(p)

    assert run_bench(bench, progress=False, execute=spy)["ran"] == 0 and ran == []  # all done: skipped
    lemoe_record = tmp_path / "out" / "cells" / "lemoe.zsre-sample.n4.b2.final.s0.json"
    finished = lemoe_record.read_text()
    lemoe_record.write_text(json.dumps({"format_version": 1, "status": "running", "steps": [], "timeline": []}))
    assert [p.state for p in plan(bench)] == ["done", "resume"]
    run_bench(bench, progress=False, execute=spy)
    assert ran == ["lemoe.zsre-sample.n4.b2.final.s0"]
    assert json.loads(lemoe_record.read_text())["aggregate"] == json.loads(finished)["aggregate"]


def test_a_finished_record_of_another_command_is_never_overwritten(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write(tmp_path, MATRIX.format(model=tiny_model_dir))
    bench = load_bench(path)
    run_bench(bench, ["ft-m*"], progress=False)
    record = tmp_path / "out" / "cells" / "ft-m.zsre-sample.n4.b2.final.s0.json"
    before = record.read_text()
    path.write_text(MATRIX.format(model=tiny_model_dir).replace("steps = 2", "steps = 1"))
    with pytest.raises(BenchConfigError, match="finished run of another command"):
        plan(load_bench(path))
    assert record.read_text() == before


def _synthetic_results(folder: Path) -> None:
    """A results.json as lemoe bench writes it: two methods, two stream lengths, curves and costs."""
    cells = {}
    for method, base in (("ft-m", 0.4), ("lemoe", 0.9)):
        for n in (10, 20):
            timeline = [
                {"edits_so_far": k, "aggregate": {"reliability.token_acc": base - k / 100, "locality.agreement": 0.9}}
                for k in range(5, n + 1, 5)
            ]
            cells[f"{method}.zsre-sample.n{n}.b5.every-1.s0"] = {
                "config": {"method": method, "method_label": method, "data": "zsre:sample", "data_label": "zsre-sample",
                           "edits": n, "edits_per_step": 5, "eval": "every:1", "seed": 0, "options": {}},
                "command": f"lemoe run --method {method} --edits {n}",
                "results": {"reliability,token_acc": base, "reliability_stderr,token_acc": 0.02,
                            "locality,agreement": 0.9, "locality_stderr,agreement": None},
                "timeline": timeline,
                "cost": {"seconds_per_edit": base * n / 10, "peak_rss_mb": 500 + n},
            }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"bench": "b.toml", "stderr": "bootstrap", "cells": cells}))


def test_report_holds_leaderboards_curves_costs_and_commands(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _synthetic_results(tmp_path / "out")
    assert main(["report", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "zsre-sample: 10 edits, 5 per step, eval every:1" in md and "0.900 ± 0.039" in md  # 1.96 x 0.02
    assert md.count("![") == 3 and all(
        (tmp_path / "out" / "report_files" / f"plot-{i}.png").is_file() for i in range(3)
    )
    assert page.count('src="data:image/png;base64,iVBOR') == 3  # PNGs embedded: one file, offline
    assert "lemoe run --method lemoe --edits 20" in page and "<script" not in page
    assert main(["report", str(tmp_path / "nothing")]) == 2  # "not a lemoe bench results file ... run lemoe bench"


def test_report_renders_in_a_headless_browser(tmp_path: Path) -> None:
    import shutil
    import subprocess

    pytest.importorskip("matplotlib")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on this machine (make test installs Debian's chromium where apt-get and root allow)")
    _synthetic_results(tmp_path / "out")
    main(["report", str(tmp_path / "out")])
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", f"--screenshot={shot}",
         (tmp_path / "out" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 1000
    # the plots' coloured lines: far more distinct colours than a page of black text on white
    colours = {
        tuple((pixels[y, x, :3] * 255).astype(int)) for y in range(0, pixels.shape[0], 3) for x in range(0, 1280, 3)
    }
    assert len(colours) > 200


RAY_MATRIX = """
model = "{model}"
out = "out"
checkpoint_every = 1
cpus = 1
[[method]]
name = "ft-m"
options = {{ steps = 8 }}
[[data]]
spec = "zsre:sample"
edits = [{n}, 6]
[[protocol]]
edits_per_step = 1
eval = "final"
"""


def _ray_worker_running(task_name: str) -> int | None:
    """The pid of the Ray worker whose process title names the task (Ray sets ``ray::<name>``)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{task_name}"):
                return int(proc.name)
    return None


def test_ray_executor_reruns_only_the_cell_whose_worker_was_killed(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A local Ray instance with two workers; one cell's worker is SIGKILLed mid-run: Ray runs that
    task again, it resumes from the cell's checkpoint, and the driver writes both records."""
    ray = pytest.importorskip("ray")
    import os
    import signal
    import threading
    import time

    n = 40
    bench = load_bench(write(tmp_path, RAY_MATRIX.format(model=tiny_model_dir, n=n)))
    long_cell = f"ft-m.zsre-sample.n{n}.b1.final.s0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary: dict = {}
        thread = threading.Thread(
            target=lambda: summary.update(run_bench(bench, progress=False, executor="ray")), daemon=True
        )
        thread.start()
        killed, deadline = None, time.time() + 240
        checkpoint = tmp_path / "out" / "checkpoints" / long_cell
        while killed is None and time.time() < deadline and thread.is_alive():
            pid = _ray_worker_running(long_cell)
            if pid is not None and checkpoint.is_dir() and any(checkpoint.iterdir()):  # mid-run, progress saved
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.05)
        thread.join(timeout=300)
        assert not thread.is_alive()
    finally:
        ray.shutdown()
    assert killed is not None, "the long cell finished before it could be killed"
    assert summary["failed"] == {} and summary["ran"] == 2
    record = json.loads((tmp_path / "out" / "cells" / f"{long_cell}.json").read_text())
    assert record["resumed_from"] is not None and len(record["per_request"]) == n  # ran again, resumed
    assert record["command"] == plan(bench, [long_cell])[0].command
    other = json.loads((tmp_path / "out" / "cells" / "ft-m.zsre-sample.n6.b1.final.s0.json").read_text())
    assert other["resumed_from"] is None  # the other cell ran once
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(results["cells"]) == sorted([long_cell, "ft-m.zsre-sample.n6.b1.final.s0"])
