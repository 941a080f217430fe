"""O-Edit / O-Edit+: orthogonality of projected updates, bases, state round trip, capacity signal."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lemoe.methods import StateError, build_method, get_method, load_method
from lemoe.methods.oedit import CapacityExhausted, CapacityWarning, OEdit, OEditPlus, subspace
from lemoe.models.access import weight_as_out_in
from lemoe.requests import EditRequest, InvalidRequestError
from lemoe.testing import tiny_model

FAST = {"knowledge_rank": 8, "knowledge_samples": 24, "steps": 8, "cache_knowledge": False}


def _requests(n: int, start: int = 0) -> list[EditRequest]:
    return [
        EditRequest(prompt=f"The favourite colour of person {i} is", target_new=f"shade {i} blue", request_id=str(i))
        for i in range(start, start + n)
    ]


def _weights(method: OEdit) -> list[torch.Tensor]:
    return [weight_as_out_in(m).detach().clone() for m in method.modules]


def _orthonormal_error(b: torch.Tensor) -> float:
    return float((b.T @ b - torch.eye(b.shape[1])).abs().max()) if b.shape[1] else 0.0


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", {}),
        ("llama", {"side": "out"}),
        ("llama", {"update_space": "full", "lr": 1e-3}),
        ("llama", {"hard_when": "final", "key_positions": "all"}),
        ("gpt2", {"knowledge_source": "gradients", "layers": [1, 2]}),
    ],
)
def test_hard_projected_updates_are_orthogonal_to_stored_bases(tokenizer, family, options) -> None:
    method = build_method("oedit-plus", tiny_model(family), tokenizer, {**FAST, **options})
    assert method.config.mode == "hard"
    for req in _requests(4):
        method.ensure_knowledge()
        bases = [method.basis(i).clone() for i in range(len(method.layers))]
        w0 = _weights(method)
        report = method.apply([req])
        for b, before, after in zip(bases, w0, _weights(method), strict=True):
            update = after - before
            assert float(update.norm()) > 0  # the edit did something
            inside = subspace.component_in(update, b, method.config.side)
            assert float(inside.norm()) <= 1e-4 * float(update.norm())
        assert all(layer["inside_fraction"] < 1e-4 for layer in report.info["layers"])
    for i in range(len(method.layers)):
        both = method.basis(i)
        assert _orthonormal_error(both) < 1e-4  # B_k and B_e jointly orthonormal
        assert method.edits[i].shape[1] > 0
    caps = method.capacity()
    assert all(c["capacity_left"] == c["limit"] - c["knowledge_rank"] - c["edit_rank"] for c in caps)


def _target_nll(model: torch.nn.Module, tokenizer: object, req: EditRequest) -> float:
    """Mean NLL of the target tokens after the prompt, on the model as it is now (no method context)."""
    prompt = tokenizer(req.prompt)["input_ids"]
    answer = tokenizer(" " + req.target_new, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer)))


def test_edits_lower_the_target_loss_and_stay_low_rank(tokenizer) -> None:
    model = tiny_model("llama")
    method = build_method("oedit-plus", model, tokenizer, {**FAST, "steps": 15})
    for req in _requests(3):
        before = _target_nll(model, tokenizer, req)
        rep = method.apply([req])
        after = _target_nll(model, tokenizer, req)
        # Measured on the written weights, before and after each edit: a flat loss (no update, or an
        # update that misses the target) fails. These edits lower it by 0.4-1.0 nats; one step by 0.1-0.2.
        assert after < before - 0.25, (req.request_id, before, after)
        assert rep.info["steps"] >= 1
        assert rep.info["layers"][0]["added_rank"] <= rep.info["span_rank"][0]  # keys bound the update rank
    assert method.batches_applied == 3


def test_soft_penalty_reduces_overlap_versus_no_penalty(tokenizer) -> None:
    def overlap(mode: str, weight: float) -> float:
        m = build_method("oedit", tiny_model("llama"), tokenizer, {**FAST, "mode": mode, "ortho_weight": weight})
        return sum(m.apply([r]).info["layers"][0]["inside_fraction"] for r in _requests(3))

    assert overlap("soft", 50.0) < overlap("none", 0.0)


def test_registry_names_and_default_modes(tokenizer) -> None:
    assert get_method("oedit") is OEdit and get_method("oedit-plus") is OEditPlus
    model = tiny_model("llama")
    assert build_method("oedit", model, tokenizer).config.mode == "soft"
    assert build_method("oedit-plus", model, tokenizer).config.mode == "hard"


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "sideways"},
        {"side": "middle"},
        {"edit_energy": 0.0},
        {"knowledge_energy": 1.5},
        {"max_rank_fraction": 0},
        {"layers": []},
        {"layers": [1, 1]},
        {"knowledge_samples": 500},
        {"lr": -1.0},
        {"capacity_policy": "ignore"},
        {"no_such_option": 1},
    ],
)
def test_bad_options_are_rejected(tokenizer, bad) -> None:
    with pytest.raises(ValueError):
        build_method("oedit", tiny_model("llama"), tokenizer, bad)


def test_layer_out_of_range(tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        build_method("oedit", tiny_model("llama"), tokenizer, {"layers": [9]})


def test_bad_batch_changes_nothing(tokenizer) -> None:
    method = build_method("oedit-plus", tiny_model("llama"), tokenizer, FAST)
    method.apply(_requests(1))
    w, e = _weights(method), [b.clone() for b in method.edits]
    with pytest.raises(InvalidRequestError):
        method.apply([*_requests(1, 5), EditRequest(prompt="x", target_new="")])
    assert all(torch.equal(a, b) for a, b in zip(w, _weights(method), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(e, method.edits, strict=True))


def test_reset_restores_weights_and_clears_edit_basis(tokenizer) -> None:
    method = build_method("oedit-plus", tiny_model("llama"), tokenizer, FAST)
    w0 = _weights(method)
    method.apply(_requests(2))
    knowledge = [b.clone() for b in method.knowledge]
    method.reset()
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(method), strict=True))
    assert all(b.shape[1] == 0 for b in method.edits) and method.rank_history == []
    assert all(torch.equal(a, b) for a, b in zip(knowledge, method.knowledge, strict=True))


def test_state_round_trip(tokenizer, tmp_path) -> None:
    method = build_method("oedit-plus", tiny_model("llama"), tokenizer, {**FAST, "layers": [1, 2]})
    for r in _requests(3):
        method.apply([r])
    method.save_pretrained(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "config.json").read_text())
    assert [c["edit_rank"] for c in meta["meta"]["capacity"]] == [b.shape[1] for b in method.edits]

    fresh = tiny_model("llama")
    loaded = load_method(str(tmp_path / "s"), fresh, tokenizer)
    assert isinstance(loaded, OEditPlus)
    assert loaded.capacity() == method.capacity()
    assert loaded.rank_history == method.rank_history and loaded.batches_applied == 3
    for a, b in zip(_weights(method), _weights(loaded), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    for i in range(2):
        assert torch.equal(method.basis(i), loaded.basis(i))
    # the loaded method keeps editing orthogonally to what it loaded
    basis = loaded.basis(0).clone()
    w0 = _weights(loaded)[0]
    loaded.apply(_requests(1, 10))
    update = _weights(loaded)[0] - w0
    assert float(subspace.component_in(update, basis, "in").norm()) <= 1e-4 * float(update.norm())


def test_corrupt_state_is_rejected_and_changes_nothing(tokenizer) -> None:
    method = build_method("oedit-plus", tiny_model("llama"), tokenizer, FAST)
    method.apply(_requests(1))
    state, meta = method.state_dict(), method.state_meta()
    target = build_method("oedit-plus", tiny_model("llama"), tokenizer, FAST)
    w0 = _weights(target)
    bad = dict(state)
    bad[f"layer{method.layers[0]}.edits"] = state[f"layer{method.layers[0]}.edits"] * 2  # not orthonormal
    with pytest.raises(StateError, match="orthonormal"):
        target.load_state_dict(bad, meta)
    missing = {k: v for k, v in state.items() if not k.endswith(".knowledge")}
    with pytest.raises(StateError, match="lacks"):
        target.load_state_dict(missing, meta)
    with pytest.raises(StateError, match="layers"):
        target.load_state_dict(state, {**meta, "layers": [0]})
    assert all(torch.equal(a, b) for a, b in zip(w0, _weights(target), strict=True))
    assert target.knowledge is None


def test_capacity_warning_then_refusal_under_raise_policy(tokenizer) -> None:
    # tiny llama: d_ff = 128, limit 0.15 * 128 = 19 dimensions, 8 of them for knowledge
    opts = {**FAST, "max_rank_fraction": 0.15, "capacity_policy": "raise", "key_positions": "all"}
    method = build_method("oedit-plus", tiny_model("llama"), tokenizer, opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = 0
        with pytest.raises(CapacityExhausted, match="refused"):
            for r in _requests(20):
                method.apply([r])
                applied += 1
    assert any(issubclass(w.category, CapacityWarning) for w in caught)
    cap = method.capacity()[0]
    assert cap["saturated"] and cap["capacity_left"] == 0
    assert cap["knowledge_rank"] + cap["edit_rank"] == cap["limit"] == 19
    assert method.batches_applied == applied  # the refused edit was not counted
    w = _weights(method)
    with pytest.raises(CapacityExhausted):
        method.apply(_requests(1, 50))
    assert torch.equal(w[0], _weights(method)[0])


def test_capacity_warn_policy_keeps_editing_against_frozen_basis(tokenizer) -> None:
    opts = {**FAST, "max_rank_fraction": 0.15, "key_positions": "all"}
    method = build_method("oedit-plus", tiny_model("llama"), tokenizer, opts)
    with pytest.warns(CapacityWarning, match="frozen basis"):
        for r in _requests(8):
            method.apply([r])
    assert method.capacity()[0]["saturated"]
    basis = method.basis(0).clone()
    w0 = _weights(method)[0]
    method.apply(_requests(1, 30))
    update = _weights(method)[0] - w0
    assert torch.equal(basis, method.basis(0))  # frozen
    assert float(subspace.component_in(update, basis, "in").norm()) <= 1e-4 * max(float(update.norm()), 1e-12)


def test_knowledge_cache_round_trip(tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path))
    opts = {**FAST, "cache_knowledge": True}
    first = build_method("oedit", tiny_model("llama"), tokenizer, opts)
    first.ensure_knowledge()
    assert len(list((tmp_path / "oedit").glob("*.safetensors"))) == 1
    second = build_method("oedit", tiny_model("llama"), tokenizer, opts)
    second.ensure_knowledge()
    assert torch.allclose(first.knowledge[0].abs(), second.knowledge[0].abs(), atol=1e-5)
    other = build_method("oedit", tiny_model("llama", seed=1), tokenizer, opts)  # another model: own entry
    other.ensure_knowledge()
    assert len(list((tmp_path / "oedit").glob("*.safetensors"))) == 2


def test_new_directions_follow_the_energy_threshold() -> None:
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(20, 3))[0]
    update = (u * torch.tensor([10.0, 3.0, 1.0])) @ torch.randn(3, 6)  # [in=20, out=6] -> as [out, in] below
    update = update.T  # [out, in]; its input-side directions are u's columns
    energy = torch.linalg.svdvals(update).pow(2)
    one = float(energy[0] / energy.sum())
    assert subspace.new_directions(update, subspace.empty_basis(20), "in", one - 1e-3, room=20).shape[1] == 1
    got = subspace.new_directions(update, subspace.empty_basis(20), "in", 0.9999, room=20)
    assert got.shape[1] == 3 and _orthonormal_error(got) < 1e-5
    assert subspace.new_directions(update, got, "in", 0.9, room=20).shape[1] == 0  # already covered
    assert subspace.new_directions(update, subspace.empty_basis(20), "in", 0.9999, room=2).shape[1] == 2


def test_top_eigenspace_rank_and_energy() -> None:
    q = torch.linalg.qr(torch.randn(10, 10))[0]
    cov = q @ torch.diag(torch.tensor([100.0, 10.0, 1.0] + [0.0] * 7)) @ q.T
    assert subspace.top_eigenspace(cov, 5).shape == (10, 3)  # zero directions never kept
    assert subspace.top_eigenspace(cov, 5, energy=0.9).shape == (10, 1)
    b = subspace.top_eigenspace(cov, 2)
    assert torch.allclose(b @ b.T @ q[:, :2], q[:, :2], atol=1e-4)


@pytest.mark.slow
def test_real_model_edit_succeeds_and_protects_basis(smollm2) -> None:
    model, tok = smollm2
    method = build_method("oedit-plus", model, tok, {"knowledge_samples": 16})
    req = EditRequest(prompt="The name of the spouse of Ebba Hay is", target_new="Jacques Chirac")
    try:
        report = method.apply([req])
        assert report.info["layers"][0]["inside_fraction"] < 1e-4
        from lemoe.evaluation import Evaluator

        scores = Evaluator(model, tok, exact_match=False).evaluate([req]).aggregate
        assert scores["reliability.token_acc"] >= 0.99
    finally:
        method.reset()
