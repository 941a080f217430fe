"""Protocols and the lifelong runner, on FT-L/FT-M (tiny model: fast; one real-model run: slow)."""

from __future__ import annotations

import json

import pytest
import torch

from lemoe.cli import main as cli_main
from lemoe.data import load_spec
from lemoe.evaluation import Evaluator
from lemoe.methods import build_method, get_method, load_method, method_names
from lemoe.methods.base import StateError
from lemoe.requests import EditRequest, InvalidRequestError
from lemoe.runner import Protocol, run_protocol
from lemoe.testing import tiny_model

FT_FAST = {"lr": 0.05, "steps": 8, "layer": 2}


@pytest.fixture(scope="module")
def sample_requests():
    reqs, _ = load_spec("zsre:sample")
    return reqs


def test_protocol_validation_and_steps(sample_requests) -> None:
    p = Protocol(edits=10, edits_per_step=3, evaluate="every:2")
    assert p.every == 2
    assert [len(s) for s in p.steps(sample_requests[:10])] == [3, 3, 3, 1]
    assert [len(c) for c in Protocol(edits=10, chunk=4).chunks(sample_requests[:10])] == [4, 4, 2]
    for bad in ({"edits": 0}, {"edits": 5, "evaluate": "sometimes"}, {"edits": 5, "chunk": 6}):
        with pytest.raises(ValueError):
            Protocol(**bad)
    shuffled = Protocol(edits=10, order="shuffle", seed=1).order_requests(sample_requests)
    assert shuffled == Protocol(edits=10, order="shuffle", seed=1).order_requests(sample_requests)
    assert shuffled != sample_requests[:10]


def test_registry() -> None:
    assert {"ft-l", "ft-m"} <= set(method_names())
    assert get_method("ft-m").name == "ft-m"
    with pytest.raises(KeyError, match="unknown method"):
        get_method("nope")


def test_final_and_immediate_differ_on_ft_l(tokenizer, sample_requests) -> None:
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False)
    method = build_method("ft-l", model, tokenizer, FT_FAST)
    final = run_protocol(method, sample_requests, Protocol(edits=20), ev, progress=False)
    immediate = run_protocol(method, sample_requests, Protocol(edits=20, evaluate="immediate"), ev, progress=False)
    rel_f, rel_i = final["aggregate"]["reliability.token_acc"], immediate["aggregate"]["reliability.token_acc"]
    assert rel_i > rel_f  # later edits overwrite earlier ones under sequential FT-L
    assert final["pre_edit"]["locality.agreement"] == 1.0
    assert len(final["per_request"]) == 20 and final["protocol"]["evaluate"] == "final"
    for key in ("method", "protocol", "scorers", "model", "aggregate", "cost", "environment", "seed"):
        assert key in final
    json.dumps(final)  # the record is JSON-serialisable


def test_same_seed_same_numbers_and_chunks_reset(tokenizer, sample_requests) -> None:
    model = tiny_model("gpt2")
    ev = Evaluator(model, tokenizer, exact_match=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits
    method = build_method("ft-m", model, tokenizer, FT_FAST)
    a = run_protocol(method, sample_requests, Protocol(edits=6, edits_per_step=2, chunk=3), ev, progress=False)
    b = run_protocol(method, sample_requests, Protocol(edits=6, edits_per_step=2, chunk=3), ev, progress=False)
    assert a["aggregate"] == b["aggregate"]
    assert len(a["timeline"]) == 2  # one final evaluation per chunk
    method.reset()
    assert torch.equal(model(input_ids=ids).logits, before)  # reset is exact, no reload needed


def test_callbacks_see_every_step_and_evaluation_as_they_happen(tokenizer, sample_requests) -> None:
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False)
    method = build_method("ft-m", model, tokenizer, FT_FAST)
    seen: list[tuple[str, int]] = []
    record = run_protocol(
        method, sample_requests, Protocol(edits=6, edits_per_step=1, evaluate="every:2"), ev, progress=False,
        on_step=lambda e: seen.append(("step", e["step"])), on_eval=lambda e: seen.append(("eval", e["edits_so_far"])),
    )  # fmt: skip
    assert seen == [("step", 0), ("step", 1), ("eval", 2), ("step", 2), ("step", 3), ("eval", 4),
                    ("step", 4), ("step", 5), ("eval", 6)]  # fmt: skip
    assert [t["edits_so_far"] for t in record["timeline"]] == [2, 4, 6]


def test_bad_batch_changes_nothing(tokenizer) -> None:
    model = tiny_model("llama")
    method = build_method("ft-m", model, tokenizer, FT_FAST)
    weight = method.module.weight.clone()
    good = EditRequest(prompt="The sky is", target_new="green")
    bad = EditRequest(prompt="The sky is", target_new="green", subject="grass")
    with pytest.raises(InvalidRequestError):
        method.apply([good, bad])
    assert torch.equal(method.module.weight, weight)
    assert method.batches_applied == 0


def test_state_round_trip_and_corruption(tokenizer, tmp_path) -> None:
    model = tiny_model("llama")
    method = build_method("ft-m", model, tokenizer, FT_FAST)
    method.apply([EditRequest(prompt="The sky is", target_new="green")])
    ids = torch.tensor([[5, 6, 7]])
    edited = model(input_ids=ids).logits
    method.save_pretrained(tmp_path / "state")
    method.reset()
    restored = load_method(str(tmp_path / "state"), model, tokenizer)
    assert torch.equal(model(input_ids=ids).logits, edited)
    assert restored.config == method.config
    with pytest.raises(StateError, match="another base model"):
        load_method(str(tmp_path / "state"), tiny_model("llama", seed=1), tokenizer)
    state = tmp_path / "state" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(StateError, match="checksum"):
        load_method(str(tmp_path / "state"), model, tokenizer)


def test_unknown_option_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown option"):
        build_method("ft-m", tiny_model("llama"), tokenizer, {"learning_rate": 1})


@pytest.mark.slow
def test_cli_run_ft_m_on_real_model(tmp_path, smollm2) -> None:
    out = tmp_path / "r.json"
    code = cli_main(
        ["run", "--method", "ft-m", "--data", "zsre:sample", "--edits", "4", "--edits-per-step", "1",
         "--eval", "final", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    agg, pre = record["aggregate"], record["pre_edit"]
    assert agg["reliability.token_acc"] > pre["reliability.token_acc"] + 0.2
    assert 0.0 <= agg["locality.agreement"] <= 1.0
    assert record["data"]["kind"] == "zsre" and record["model"]["name"] == "smollm2-135m"


def test_cli_eval_reads_a_partial_results_file(tmp_path, capsys) -> None:
    path = tmp_path / "running.json"
    steps = [{"step": 0, "n": 30}, {"step": 1, "n": 30}]
    timeline = [{"edits_so_far": 60, "aggregate": {"reliability.token_acc": 0.5}}]
    path.write_text(json.dumps({"status": "running", "method": "memit", "steps": steps, "timeline": timeline}))
    assert cli_main(["eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert "run in progress, 60 edits applied" in out and '"reliability.token_acc": 0.5' in out
