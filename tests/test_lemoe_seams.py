"""LEMoE's parts on their own: the router's key table, the edits' state, the calibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lemoe.methods.base import StateError
from lemoe.methods.lemoe.calibration import Calibration
from lemoe.methods.lemoe.experts import Expert
from lemoe.methods.lemoe.router import NULL
from lemoe.methods.lemoe.routing import Router
from lemoe.methods.lemoe.state import Edits

D = 8


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_router_prompt_keys_route_and_renumber_on_removal() -> None:
    table = Router.empty(D, torch.device("cpu"))
    keys = unit(3, D)
    for e in range(3):
        table.add_prompt_keys(keys[e : e + 1], e)
    assert table.route_queries(keys, threshold=0.99).tolist() == [0, 1, 2]
    assert table.route_queries(-keys, threshold=0.99).tolist() == [NULL] * 3
    before = table.keys
    table.remove_expert(1)
    assert before.shape[0] == 3  # copy on write: the earlier tensor is not altered
    assert table.route_queries(keys, threshold=0.99).tolist() == [0, NULL, 1]


def test_router_subject_keys_get_their_own_thresholds() -> None:
    table = Router.empty(D, torch.device("cpu"))
    calibration = (unit(4, 5, D, seed=1), torch.ones(4, 5, dtype=torch.bool))
    spans = [unit(2, D, seed=2), unit(3, D, seed=3)]
    table.add_subject_keys(spans, expert=0, calibration=calibration, margin=0.1)
    assert table.size == 5 and table.next_key == 2
    assert table.slot_key.tolist() == [0, 0, 1, 1, 1]
    assert bool((table.slot_threshold > 0).all()) and bool((table.slot_threshold <= 0.999).all())
    # a text holding the first subject's tokens routes to expert 0; unrelated tokens do not
    text = torch.cat([unit(2, D, seed=9), spans[0]])[None]
    assert table.route_spans(text, torch.ones(1, 4, dtype=torch.bool), null_route=True).tolist() == [0]
    assert table.route_spans(-text, torch.ones(1, 4, dtype=torch.bool), null_route=True).tolist() == [NULL]


def _edits(n: int) -> Edits:
    edits = Edits.empty(D, D, 4, D, torch.float32, torch.device("cpu"))
    for b in range(n):
        edits.add_expert(Expert(D, D, 4, 0.1, torch.Generator().manual_seed(b)), b, [f"r{b}"], shared=False)
        edits.router.add_prompt_keys(unit(1, D, seed=b), b)
    return edits


def _state(edits: Edits) -> dict[str, torch.Tensor]:
    return {
        **edits.tensors(),
        "router.mean": torch.zeros(D),
        "router.std": torch.ones(D),
        "router.threshold": torch.tensor([0.5], dtype=torch.float64),
    }


def test_edits_roundtrip_and_rollback() -> None:
    edits = _edits(3)
    meta = {**edits.meta(), "route_key": "prompt"}
    loaded = Edits.from_state(
        _state(edits), meta, dims=(D, D, 4, D), subject=False, dtype=torch.float32, device=torch.device("cpu")
    )
    assert loaded.expert_batches == [0, 1, 2] and loaded.expert_requests == [["r0"], ["r1"], ["r2"]]
    torch.testing.assert_close(loaded.bank.w1, edits.bank.w1, rtol=0, atol=0)
    loaded.remove_batch(1)
    assert loaded.expert_batches == [0, 2] and loaded.router.key_expert.tolist() == [0, 1]
    torch.testing.assert_close(loaded.bank.w1[1], edits.bank.w1[2], rtol=0, atol=0)
    with pytest.raises(KeyError, match="no expert for batch 1"):
        loaded.remove_batch(1)


def test_edits_refuse_a_state_that_does_not_fit() -> None:
    edits = _edits(2)
    meta = {**edits.meta(), "route_key": "prompt"}
    cpu = torch.device("cpu")
    state = _state(edits)
    with pytest.raises(StateError, match="misses"):
        Edits.from_state(
            {k: v for k, v in state.items() if k != "router.keys"},
            meta,
            dims=(D, D, 4, D),
            subject=False,
            dtype=torch.float32,
            device=cpu,
        )
    with pytest.raises(StateError, match="does not match"):  # another expert width
        Edits.from_state(state, meta, dims=(D, D, 5, D), subject=False, dtype=torch.float32, device=cpu)
    with pytest.raises(StateError, match="does not match"):  # a key routed to an expert that is not there
        bad = {**state, "router.key_expert": torch.tensor([0, 7])}
        Edits.from_state(bad, meta, dims=(D, D, 4, D), subject=False, dtype=torch.float32, device=cpu)
    with pytest.raises(StateError, match="does not match"):  # saved with subject keys
        Edits.from_state(state, meta, dims=(D, D, 4, D), subject=True, dtype=torch.float32, device=cpu)


def test_calibration_threshold_separates_unrelated_texts() -> None:
    hidden = [torch.randn(6, D, generator=torch.Generator().manual_seed(i)) * 3 + 1 for i in range(12)]
    cal = Calibration()
    assert not cal.ready
    cal.fit(hidden, quantile=0.95, margin=0.0, keep_tokens=True)
    assert cal.ready and cal.token_vectors is not None
    q = cal.pool(hidden)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(12))
    sims = q @ q.T
    sims.fill_diagonal_(-1)
    assert float((sims.max(1).values <= cal.threshold).float().mean()) >= 0.9  # the 95 % quantile
    vectors, valid = cal.token_batch([*hidden[:2], hidden[2][:3]], None)
    assert vectors.shape == (3, 6, D) and valid.sum(1).tolist() == [6, 6, 3]
    cal.fit_token_threshold(hidden, quantile=0.95, margin=0.0)
    assert cal.token_threshold is not None and cal.token_threshold <= 0.999


def test_appending_rows_copies_only_the_new_ones_and_never_alters_an_earlier_view(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from lemoe.methods.lemoe.rows import append_rows

    current = {"a": torch.zeros(0, 3), "b": torch.zeros(0, dtype=torch.long)}
    buffer, snapshots, reallocations = None, [], 0
    for i in range(40):
        new = {"a": torch.full((1, 3), float(i)), "b": torch.tensor([i])}
        before = buffer
        current, buffer = append_rows(current, new, buffer)
        reallocations += buffer is not before
        snapshots.append({k: v for k, v in current.items()})
    assert reallocations <= 8  # geometric growth, not one copy of everything per append
    for i, snap in enumerate(snapshots):  # every view handed out still holds exactly its rows
        assert snap["b"].tolist() == list(range(i + 1))
        assert snap["a"][:, 0].tolist() == [float(j) for j in range(i + 1)]
    # a holder of an older view appends into a fresh buffer, not over the newer rows
    forked, fork_buffer = append_rows(snapshots[9], {"a": -torch.ones(1, 3), "b": torch.tensor([-1])}, buffer)
    assert fork_buffer is not buffer and forked["b"].tolist() == [*range(10), -1]
    assert current["b"].tolist() == list(range(40))
    save_file({k: v.contiguous() for k, v in snapshots[4].items()}, str(tmp_path / "s.safetensors"))
    assert load_file(str(tmp_path / "s.safetensors"))["b"].tolist() == list(range(5))


def test_hnsw_candidates_route_exactly_like_scoring_every_key(tokenizer) -> None:
    pytest.importorskip("faiss")
    from lemoe.methods.lemoe.segments import token_classes

    d, n_keys = 32, 300
    g = torch.Generator().manual_seed(5)
    spans = [
        F.normalize(torch.randn(int(torch.randint(1, 4, (1,), generator=g)), d, generator=g), dim=-1)
        for _ in range(n_keys)
    ]
    calibration = (F.normalize(torch.randn(20, 8, d, generator=g), dim=-1), torch.ones(20, 8, dtype=torch.bool))
    exact = Router.empty(d, torch.device("cpu"))
    for e in range(0, n_keys, 10):  # one expert per 10 keys, appended batch by batch
        exact.add_subject_keys(spans[e : e + 10], e // 10, calibration, margin=0.3)
    indexed = Router(*(getattr(exact, f) for f in ("keys", "key_expert", "slot_key", "slot_offset", "slot_threshold")))
    indexed.next_key, indexed.index_min_slots, indexed.index_neighbours = exact.next_key, 1, 8
    # texts: some hold a (slightly noisy) subject among random tokens, some only random tokens
    texts = []
    for i in range(40):
        noise = F.normalize(torch.randn(6, d, generator=g), dim=-1)
        if i % 2 == 0:
            span = spans[(i * 7) % n_keys]
            noise[1 : 1 + span.shape[0]] = F.normalize(span + 0.05 * torch.randn(span.shape, generator=g), dim=-1)
        texts.append(noise)
    q, valid = torch.stack(texts), torch.ones(40, 6, dtype=torch.bool)
    want = exact.route_spans(q, valid, null_route=True)
    assert (want >= 0).sum() >= 18 and (want[1::2] < 0).all()
    assert torch.equal(indexed.route_spans(q, valid, null_route=True), want)
    assert indexed.index is not None and indexed.index.size == indexed.size
    ids = torch.randint(5, 50, (40, 6), generator=g)
    classes = token_classes(tokenizer, len(tokenizer))
    kwargs = {"null_route": True, "min_tokens": 1, "positions": "subject"}
    assert torch.equal(
        indexed.route_clauses(q, valid, ids, classes, **kwargs), exact.route_clauses(q, valid, ids, classes, **kwargs)
    )
    indexed.remove_expert(0)  # a rollback drops the index; the next call rebuilds it
    exact.remove_expert(0)
    assert indexed.index is None
    assert torch.equal(indexed.route_spans(q, valid, null_route=True), exact.route_spans(q, valid, null_route=True))
