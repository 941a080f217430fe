"""Durable writes, pickle-free trainer state, model identity and results records (issue 28, items 4-6)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from lemoe import fileio
from lemoe.methods import build_method
from lemoe.methods.base import StateError
from lemoe.models.identity import fingerprint_mismatch, model_fingerprint
from lemoe.runner import RESULTS_FORMAT_VERSION, ResultsFormatError, read_results, write_results
from lemoe.testing import tiny_model


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_atomic_path_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    fileio.write_text(target, "one")
    fileio.write_text(target, "two")
    assert target.read_text() == "two"
    assert _leftovers(target.parent) == []


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    fileio.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError, match="boom"), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert _leftovers(tmp_path) == []


def test_temp_names_are_unique_per_call(tmp_path: Path) -> None:
    """Two concurrent writers of one path never share a temp file (``write_results`` used a fixed ``.tmp``)."""
    target = tmp_path / "r.json"
    with fileio.atomic_path(target) as a, fileio.atomic_path(target) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the outer writer finished last
    assert _leftovers(tmp_path) == []


def test_write_json_refuses_silent_stringification(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        fileio.write_json(target, {"bad": object()})
    assert not target.exists() and _leftovers(tmp_path) == []
    # the explicit conversions: numeric scalars and paths
    import numpy as np

    fileio.write_json(target, {"t": torch.tensor(2.5), "n": np.float32(1.5), "p": Path("/a/b")})
    assert json.loads(target.read_text()) == {"t": 2.5, "n": 1.5, "p": "/a/b"}


def test_atomic_directory_refuses_non_empty_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with fileio.atomic_directory(out) as tmp:
        (tmp / "a").write_text("a")
    assert (out / "a").read_text() == "a"
    with pytest.raises(FileExistsError), fileio.atomic_directory(out):
        pass
    with pytest.raises(ValueError), fileio.atomic_directory(tmp_path / "other") as tmp:
        (tmp / "b").write_text("b")
        raise ValueError
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tree_round_trip_with_optimizer_state(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.8, 0.9))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "history": [{"loss": 0.5}], "rng": torch.get_rng_state()}
    fileio.save_tree(tmp_path / "t.json", state)
    back = fileio.load_tree(tmp_path / "t.json")
    assert back["step"] == 7 and back["history"] == [{"loss": 0.5}]
    assert torch.equal(back["rng"], state["rng"])
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys keep their type
    opt2 = torch.optim.Adam(net.parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="without pickling"):
        fileio.save_tree(tmp_path / "u.json", {"x": object()})


def test_tree_refuses_mismatched_or_corrupt_pair(tmp_path: Path) -> None:
    fileio.save_tree(tmp_path / "a.json", {"w": torch.ones(3)})
    fileio.save_tree(tmp_path / "b.json", {"w": torch.zeros(3)})
    (tmp_path / "a.json.tensors").write_bytes((tmp_path / "b.json.tensors").read_bytes())
    with pytest.raises(ValueError, match="checksum"):
        fileio.load_tree(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        fileio.load_tree(tmp_path / "b.json")


def test_trainer_resume_refuses_an_old_pickle(tmp_path: Path) -> None:
    """A ``trainer.pt`` from elsewhere is never unpickled: the resume refuses it before reading it."""
    from lemoe.cli.train_editor import main

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.write_text, (marker, "ran"))

    (out / "trainer.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(SystemExit, match="pickle"):
        main(["--counterfact", "x.json", "--out", str(out), "--resume", "--model", "unused"])
    assert not marker.exists()


# -- model identity ------------------------------------------------------------------------------


def test_fingerprint_sees_a_change_in_a_middle_layer() -> None:
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)  # same seed, same weights
    names = [n for n, _ in b.named_parameters()]
    middle = names[len(names) // 2]
    with torch.no_grad():
        b.get_parameter(middle).mul_(1.01)  # a "fine-tune" of one middle tensor only
    assert model_fingerprint(a) != model_fingerprint(b)
    assert "another base model" in (fingerprint_mismatch(model_fingerprint(a), model_fingerprint(b)) or "")


def test_old_scheme_fingerprint_gets_a_clear_message() -> None:
    fp = model_fingerprint(tiny_model("llama"))
    old = {k: v for k, v in fp.items() if k not in ("scheme", "tensors")}
    msg = fingerprint_mismatch(old, fp)
    assert msg is not None and "scheme" in msg and "re-create" in msg


def test_base_fingerprint_is_taken_before_in_place_edits(tokenizer, tmp_path: Path) -> None:
    """FT-M edits weights in place; its saved state still names the unedited model and loads onto it."""
    from lemoe.requests import EditRequest

    model = tiny_model("llama")
    method = build_method("ft-m", model, tokenizer, {"steps": 2, "lr": 1e-2})
    assert method.base_fingerprint == model_fingerprint(tiny_model("llama"))
    method.apply([EditRequest(prompt="Alice Martin works as a", target_new=" pilot", subject="Alice Martin")])
    assert model_fingerprint(model) != method.base_fingerprint  # the weights did change
    method.save_pretrained(tmp_path / "s")
    type(method).from_pretrained(tmp_path / "s", tiny_model("llama"), tokenizer)  # the unedited base
    with pytest.raises(StateError, match="another base model"):
        type(method).from_pretrained(tmp_path / "s", tiny_model("llama", seed=1), tokenizer)


# -- results records -----------------------------------------------------------------------------


def test_results_record_has_format_version_and_newer_is_refused(tmp_path: Path) -> None:
    path = write_results({"method": {"name": "x"}, "aggregate": {}}, tmp_path / "r.json")
    record = read_results(path)
    assert record["format_version"] == RESULTS_FORMAT_VERSION
    path.write_text(json.dumps({"format_version": RESULTS_FORMAT_VERSION + 1, "method": {}}))
    with pytest.raises(ResultsFormatError, match="upgrade"):
        read_results(path)
    with pytest.raises(TypeError):
        write_results({"method": {"name": "x"}, "bad": object()}, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()
