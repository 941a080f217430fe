"""Resumable runs: a run cut short continues from its last checkpoint and ends where an uncut run ends."""

from __future__ import annotations

import json

import pytest
import torch

from lemoe.data import load_spec
from lemoe.evaluation import Evaluator
from lemoe.methods import build_method
from lemoe.runner import CheckpointMismatch, Protocol, RunCheckpoint, run_protocol
from lemoe.testing import tiny_model

FT_FAST = {"lr": 0.05, "steps": 8, "layer": 2}


class Cut(RuntimeError):
    """Stands in for a crash or a time limit in the middle of a run."""


@pytest.fixture(scope="module")
def sample_requests():
    reqs, _ = load_spec("zsre:sample")
    return reqs


def _cut_after(n: int):
    seen = []

    def on_step(entry: dict) -> None:
        seen.append(entry)
        if len(seen) == n:
            raise Cut(f"cut after step {n}")

    return on_step


@pytest.mark.parametrize(
    ("protocol", "saved_steps"),
    [
        (Protocol(edits=12, edits_per_step=2, evaluate="every:2"), 4),  # checkpoints after steps 2 and 4
        (Protocol(edits=12, edits_per_step=2, chunk=6), 3),  # after step 2 and at the end of chunk 0
    ],
    ids=["every", "chunked"],
)
def test_cut_run_resumes_and_matches_an_uncut_run(tokenizer, sample_requests, tmp_path, protocol, saved_steps) -> None:
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False)
    method = build_method("ft-l", model, tokenizer, FT_FAST)
    uncut = run_protocol(method, sample_requests, protocol, ev, progress=False)

    extra_seen: list[dict] = []
    ckpt = RunCheckpoint(
        tmp_path / "ckpt",
        every=2,
        save_extra=lambda: {"marker": 7},
        restore_extra=extra_seen.append,
    )
    with pytest.raises(Cut):  # 6 steps in all; cut during step 5
        run_protocol(method, sample_requests, protocol, ev, progress=False, on_step=_cut_after(5), checkpoint=ckpt)
    saved = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert len(saved["log"]["steps"]) == saved_steps
    assert len(list((tmp_path / "ckpt").glob("state-*"))) == 1  # older states are removed

    method.reset()
    method.apply(sample_requests[:1])  # the resumed run must not depend on what the model holds now
    steps_after_resume: list[dict] = []
    resumed = run_protocol(
        method, sample_requests, protocol, ev, progress=False, on_step=steps_after_resume.append, checkpoint=ckpt
    )
    assert len(steps_after_resume) == 6 - saved_steps  # only the steps after the checkpoint run again
    assert resumed["resumed_from"] == {"chunk": saved["chunk"], "step": saved["step"]}
    assert uncut["resumed_from"] is None
    assert extra_seen == [{"marker": 7}]
    assert len(resumed["steps"]) == len(uncut["steps"]) == 6
    assert resumed["pre_edit"] == uncut["pre_edit"]
    again = run_protocol(method, sample_requests, protocol, ev, progress=False, on_step=_cut_after(1), checkpoint=ckpt)
    assert again["aggregate"] == resumed["aggregate"]  # a finished run's checkpoint replays no step
    assert [t["edits_so_far"] for t in resumed["timeline"]] == [t["edits_so_far"] for t in uncut["timeline"]]
    for a, b in zip(resumed["per_request"], uncut["per_request"], strict=True):
        assert a["request_id"] == b["request_id"]
        for k in a:
            if k != "request_id":
                assert a[k] == pytest.approx(b[k], abs=1e-6), k
    # the final evaluation's samples, per probe: chunk 0's from the checkpoint log when chunked
    assert len(resumed["samples"]) == len(uncut["samples"]) > len(sample_requests[:12])
    for a, b in zip(resumed["samples"], uncut["samples"], strict=True):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    ckpt.clear()
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_of_another_run_is_refused(tokenizer, sample_requests, tmp_path) -> None:
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False)
    method = build_method("ft-l", model, tokenizer, FT_FAST)
    ckpt = RunCheckpoint(tmp_path / "ckpt", every=1)
    with pytest.raises(Cut):
        run_protocol(
            method, sample_requests, Protocol(edits=4), ev, progress=False, on_step=_cut_after(2), checkpoint=ckpt
        )
    before = [p.detach().clone() for p in model.parameters()]
    for other in (Protocol(edits=5), Protocol(edits=4, seed=1)):
        with pytest.raises(CheckpointMismatch, match="another run"):
            run_protocol(method, sample_requests, other, ev, progress=False, checkpoint=ckpt)
    other_method = build_method("ft-l", model, tokenizer, {**FT_FAST, "lr": 0.01})
    with pytest.raises(CheckpointMismatch, match="another run"):
        run_protocol(other_method, sample_requests, Protocol(edits=4), ev, progress=False, checkpoint=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing changed

    (tmp_path / "ckpt" / "progress.json").write_text("{not json")
    with pytest.raises(CheckpointMismatch, match="corrupt"):
        run_protocol(method, sample_requests, Protocol(edits=4), ev, progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match="every"):
        RunCheckpoint(tmp_path / "x", every=0)


@pytest.mark.slow
def test_cli_run_resumes_a_cut_run_on_the_real_model(tmp_path, smollm2) -> None:
    """A run cut after step 2 of 4 (same method, data and protocol as the CLI's) resumes in ``lemoe run``."""
    from lemoe.cli import main as cli_main

    model, tok = smollm2
    requests, _ = load_spec("zsre:sample")
    method = build_method("ft-m", model, tok, {})
    ckpt = RunCheckpoint(tmp_path / "ck", every=2)
    try:
        with pytest.raises(Cut):
            run_protocol(
                method, requests, Protocol(edits=4), Evaluator(model, tok), progress=False,
                on_step=_cut_after(3), checkpoint=ckpt,
            )  # fmt: skip
    finally:
        method.reset()
    out = tmp_path / "r.json"
    code = cli_main(
        ["run", "--method", "ft-m", "--data", "zsre:sample", "--edits", "4", "--out", str(out), "--quiet",
         "--checkpoint", str(tmp_path / "ck"), "--checkpoint-every", "2"]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["resumed_from"] == {"chunk": 0, "step": 2}
    assert record["command"].startswith("lemoe run --method ft-m --data zsre:sample --edits 4 --out ")
    assert len(record["steps"]) == 4 and len(record["per_request"]) == 4
    assert record["aggregate"]["reliability.token_acc"] > record["pre_edit"]["reliability.token_acc"] + 0.2
    assert not (tmp_path / "ck").exists()  # removed once the results are written


def test_checkpoint_refuses_a_folder_of_user_files_and_changes_nothing(tmp_path, capsys) -> None:
    """The exact user mistake: ``--checkpoint ~/experiments``. Refused before any work; files survive."""
    from lemoe.cli import main as cli_main

    folder = tmp_path / "experiments"
    (folder / "state-mine").mkdir(parents=True)  # even a name like the checkpoint's own is the user's
    (folder / "notes.txt").write_text("my notes")
    (folder / "state-mine" / "weights.bin").write_bytes(b"\x00" * 16)
    before = sorted((p.relative_to(folder), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))
    code = cli_main(["run", "--method", "ft-m", "--data", "zsre:sample", "--edits", "2", "--quiet",
                     "--checkpoint", str(folder)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "empty directory" in err
    after = sorted((p.relative_to(folder), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))
    assert after == before
    with pytest.raises(CheckpointMismatch, match="not a directory"):
        RunCheckpoint(folder / "notes.txt")


def test_clear_removes_only_what_the_checkpoint_wrote(tokenizer, sample_requests, tmp_path) -> None:
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False)
    method = build_method("ft-l", model, tokenizer, FT_FAST)
    protocol = Protocol(edits=6, edits_per_step=1)

    given = tmp_path / "given"  # an empty directory the user made: it stays, empty
    given.mkdir()
    ckpt = RunCheckpoint(given, every=2)
    run_protocol(method, sample_requests, protocol, ev, progress=False, checkpoint=ckpt)
    assert (given / "progress.json").is_file()
    ckpt.clear()
    assert given.is_dir() and not any(given.iterdir())

    made = tmp_path / "made"  # created by the checkpoint; a file added during the run survives
    method.reset()
    ckpt = RunCheckpoint(made, every=2)
    with pytest.raises(Cut):
        run_protocol(method, sample_requests, protocol, ev, progress=False, on_step=_cut_after(3), checkpoint=ckpt)
    (made / "notes.txt").write_text("kept")
    (made / "state-notes").mkdir()
    method.reset()
    resumed = RunCheckpoint(made, every=2)  # a new process: learns from progress.json that it made the folder
    run_protocol(method, sample_requests, protocol, ev, progress=False, checkpoint=resumed)
    assert (made / "state-notes").is_dir()  # not the checkpoint's naming: never pruned
    resumed.clear()
    assert sorted(p.name for p in made.iterdir()) == ["notes.txt", "state-notes"]
    assert (made / "notes.txt").read_text() == "kept"

    method.reset()
    fresh = tmp_path / "fresh"
    ckpt = RunCheckpoint(fresh, every=2)
    run_protocol(method, sample_requests, protocol, ev, progress=False, checkpoint=ckpt)
    ckpt.clear()
    assert not fresh.exists()  # created by the checkpoint and left empty: removed
