"""LEMoE: insertion, routing consistency, null route, frozen experts, persistence, rollback, planning."""

from __future__ import annotations

import pytest
import torch

from lemoe.evaluation import Evaluator
from lemoe.evaluation.scorers import greedy_generate, teacher_forced_predictions
from lemoe.methods import build_method, load_method
from lemoe.methods.base import RollbackNotSupported, StateError
from lemoe.methods.lemoe import LEMoE, StreamingPlanner, kmeans, plan_clustered
from lemoe.methods.lemoe.experts import Expert, ExpertBank, apply_per_sequence
from lemoe.methods.lemoe.router import NULL, route
from lemoe.requests import EditRequest, InvalidRequestError
from lemoe.testing import tiny_model
from lemoe.tokens import encode_pairs

FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gpt2", "gptj", "gpt_neox", "opt"]
OPTS = {"layer": 2, "steps": 40, "lr": 2e-2, "train_chat": False}  # chat wording: test_lemoe_clauses
EDITS = [
    EditRequest(prompt="The capital of Freedonia is", target_new="Quuxville"),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target_new="Klingon"),
    EditRequest(prompt="Which river does the town of Brno lie on?", target_new="Amazon"),
]
UNRELATED = ["How do bees make honey?", "Please write a short poem about the sea."]


def _logits(model: torch.nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    tokenizer.padding_side = "right"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_insertion_is_exact_noop_then_edits_every_family(family: str, tokenizer) -> None:
    model = tiny_model(family)
    prompts = [EDITS[0].prompt, *UNRELATED]
    base = _logits(model, tokenizer, prompts)
    # Tiny Gemma 3 is the hardest to edit: it renormalises every MLP output (post-feedforward norm)
    # and its tied, small random embeddings give logits about one unit apart. A layer-2 expert had
    # not reached the target after 100 steps; a layer-1 expert reaches it in about 40.
    opts = {**OPTS, "layer": 1, "steps": 100} if family == "gemma3" else OPTS
    method = build_method("lemoe", model, tokenizer, opts)
    assert torch.equal(_logits(model, tokenizer, prompts), base)  # hooks, no expert: identical
    report = method.apply([EDITS[0]])
    assert report.info["accuracy"] == 1.0
    assert method.route_prompts(prompts).tolist() == [0, NULL, NULL]
    after = _logits(model, tokenizer, prompts)
    assert not torch.equal(after[0], base[0])
    assert torch.equal(after[1:], base[1:])  # null route: unrelated inputs bit-identical
    method.remove_hooks()
    assert torch.equal(_logits(model, tokenizer, prompts), base)


def test_new_expert_is_a_noop_and_batched_gather_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    experts = [Expert(8, 8, 4, 0.5, g) for _ in range(3)]
    x = torch.randn(4, 5, 8)
    assert torch.equal(experts[0](x, torch.nn.functional.gelu), torch.zeros(4, 5, 8))
    for e in experts:
        torch.nn.init.normal_(e.w2)
    bank = ExpertBank.empty(8, 8, 4, torch.float32, torch.device("cpu"))
    for e in experts:
        bank = bank.append(e)
    choice = torch.tensor([2, NULL, 0, 2])
    out = apply_per_sequence(bank, x, choice, torch.nn.functional.gelu)
    assert out is not None
    for b, c in enumerate(choice.tolist()):
        want = torch.zeros(5, 8) if c < 0 else experts[c](x[b], torch.nn.functional.gelu)
        torch.testing.assert_close(out[b], want)
    assert apply_per_sequence(bank, x, torch.full((4,), NULL), torch.nn.functional.gelu) is None


def test_route_prefers_newest_on_ties_and_null_below_threshold() -> None:
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    owner = torch.tensor([0, 1, 2])
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]), dim=-1)
    choice, _ = route(q, keys, owner, 0.9)
    assert choice.tolist() == [1, 2, NULL]


@pytest.fixture
def edited(tokenizer):
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, OPTS)
    for r in EDITS:
        method.apply([r])
    return model, method


def test_frozen_experts_stay_bit_identical(tokenizer) -> None:
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, OPTS)
    method.apply([EDITS[0]])
    first = {k: v.clone() for k, v in method.bank.tensors().items()}
    method.apply([EDITS[1]])
    method.apply([EDITS[2]])
    for k, v in method.bank.tensors().items():
        assert torch.equal(v[0], first[k][0])
    assert method.route_prompts([r.prompt for r in EDITS]).tolist() == [0, 1, 2]


def _assert_routing_consistent(model, method, tokenizer) -> None:
    prompts = [r.prompt for r in EDITS] + UNRELATED
    expected = method.route_prompts(prompts)  # the computation that makes anchors at training time
    assert expected.tolist() == [0, 1, 2, NULL, NULL]
    pairs = encode_pairs(tokenizer, prompts, ["Quuxville"] * len(prompts))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].answer_ids))
    with method.record_decisions() as tf:
        teacher_forced_predictions(model, tokenizer, pairs, batch_size=8, context=method.forward_context)
    assert torch.equal(tf[0], expected[order])  # prompt-only pooling although the answer is fed too
    gen_order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids))
    with method.record_decisions() as gd:
        greedy_generate(
            model,
            tokenizer,
            [p.prompt_ids for p in pairs],
            [4] * len(pairs),
            batch_size=8,
            context=method.forward_context,
        )
    assert len(gd) == 1 and torch.equal(gd[0], expected[gen_order])  # one decision, kept while decoding
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with method.record_decisions() as hf:
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    assert len(hf) == 1 and torch.equal(hf[0], expected)


def test_routing_identical_in_training_evaluation_and_generation(edited, tokenizer) -> None:
    _assert_routing_consistent(*edited, tokenizer)


def test_routing_behind_a_separator_is_identical_too(tokenizer) -> None:
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, {**OPTS, "route_prefix": True})
    method.apply([EDITS[0]])
    method.apply([EDITS[1]])
    method.apply([EDITS[2]])
    _assert_routing_consistent(model, method, tokenizer)


def test_save_load_round_trip_on_fresh_model(edited, tokenizer, tmp_path) -> None:
    model, method = edited
    prompts = [r.prompt for r in EDITS] + UNRELATED
    want = _logits(model, tokenizer, prompts)
    method.save_pretrained(tmp_path / "adaptor")
    fresh = tiny_model("llama")
    loaded = load_method(str(tmp_path / "adaptor"), fresh, tokenizer)
    assert isinstance(loaded, LEMoE) and loaded.n_experts == 3
    assert torch.equal(_logits(fresh, tokenizer, prompts), want)
    assert loaded.route_prompts(prompts).tolist() == method.route_prompts(prompts).tolist()


def test_corrupt_state_is_rejected(edited, tokenizer, tmp_path) -> None:
    _, method = edited
    state, meta = method.state_dict(), method.state_meta()
    fresh = build_method("lemoe", tiny_model("llama"), tokenizer, OPTS)
    bad = dict(state)
    bad["experts.w1"] = bad["experts.w1"][:, :, :3]
    with pytest.raises(StateError):
        fresh.load_state_dict(bad, meta)
    with pytest.raises(StateError):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "router.keys"}, meta)
    with pytest.raises(StateError):
        fresh.load_state_dict(state, {**meta, "expert_batches": [0]})
    assert fresh.n_experts == 0


def test_rollback_removes_one_batch_only(edited, tokenizer) -> None:
    model, method = edited
    prompts = [r.prompt for r in EDITS]
    before = _logits(model, tokenizer, prompts)
    method.remove_hooks()
    base = _logits(model, tokenizer, prompts)
    method2 = build_method("lemoe", model, tokenizer, OPTS)
    method2.load_state_dict(method.state_dict(), method.state_meta())
    method2.rollback(1)
    after = _logits(model, tokenizer, prompts)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert torch.equal(after[1], base[1])
    assert method2.route_prompts(prompts).tolist() == [0, NULL, 1]
    with pytest.raises(KeyError):
        method2.rollback(1)


def test_disabled_gives_the_bare_base_model(edited, tokenizer) -> None:
    model, method = edited
    prompts = [EDITS[0].prompt, *UNRELATED]
    edited_logits = _logits(model, tokenizer, prompts)
    with method.disabled():
        assert torch.equal(_logits(model, tokenizer, prompts), _logits(tiny_model("llama"), tokenizer, prompts))
    assert torch.equal(_logits(model, tokenizer, prompts), edited_logits)


def test_reset_restores_base(edited, tokenizer) -> None:
    model, method = edited
    method.reset()
    fresh = tiny_model("llama")
    prompts = [EDITS[0].prompt, *UNRELATED]
    assert torch.equal(_logits(model, tokenizer, prompts), _logits(fresh, tokenizer, prompts))


def test_bad_options_and_batches_change_nothing(tokenizer) -> None:
    model = tiny_model("llama")
    n_hooks = len(model._forward_pre_hooks)
    for bad in (
        {"expert_width": 0},
        {"layer": 9},
        {"route_layer": 3, "layer": 2},
        {"null_quantile": 2.0},
        {"calibration_texts": ["only one"]},
        {"activation": "tanh"},
    ):
        with pytest.raises(ValueError):
            build_method("lemoe", model, tokenizer, bad)
    assert len(model._forward_pre_hooks) == n_hooks
    with pytest.raises(ValueError):
        build_method("lemoe", model, tokenizer, {"no_such_option": 1})
    method = build_method("lemoe", model, tokenizer, OPTS)
    with pytest.raises(InvalidRequestError):
        method.apply([EDITS[0], "not a request"])  # type: ignore[list-item]
    assert method.n_experts == 0 and method.batches_applied == 0


def test_token_gating_and_shared_expert_modes(tokenizer) -> None:
    model = tiny_model("llama")
    token = build_method("lemoe", model, tokenizer, {**OPTS, "routing": "token", "route_key": "prompt"})
    token.apply([EDITS[0]])
    assert token.n_experts == 1
    token.remove_hooks()
    shared = build_method("lemoe", model, tokenizer, {**OPTS, "expert_mode": "shared"})
    shared.apply([EDITS[0]])
    shared.apply([EDITS[1]])
    assert shared.n_experts == 1 and set(shared.router.key_expert.tolist()) == {0}
    with pytest.raises(RollbackNotSupported):
        shared.rollback(0)


def test_clustered_planning_and_streaming() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 5
    x = torch.cat([c + 0.1 * torch.randn(4, 16, generator=g) for c in centers])
    perm = torch.randperm(12, generator=g)
    labels = kmeans(x[perm], 3, seed=0)
    truth = (perm // 4).tolist()
    assert len({(a, b) for a, b in zip(labels.tolist(), truth, strict=True)}) == 3  # clusters recovered
    items = list(range(12))
    batches = plan_clustered(items, x[perm], 4)
    assert sorted(i for b in batches for i in b) == items
    assert all(len({truth[i] for i in b}) == 1 for b in batches)  # each batch is one cluster
    planner = StreamingPlanner(lambda xs, bs: plan_clustered(xs, x[perm][xs], bs), batch_size=4, buffer_size=8)
    out = [b for i in items for b in planner.add(i)] + planner.flush()
    assert sorted(i for b in out for i in b) == items and all(len(b) <= 4 for b in out)


def test_plan_batches_arrival_and_cluster(tokenizer) -> None:
    model = tiny_model("llama")
    # Two kinds of edit arriving interleaved: clustering must regroup them, arrival order must not.
    cities = [EditRequest(prompt=f"The capital city of the country {c} is", target_new="Paris") for c in "XYZ"]
    bees = [
        EditRequest(prompt=f"How do the bees of hive number {i} make honey?", target_new="slowly") for i in range(3)
    ]
    reqs = [r for pair in zip(cities, bees, strict=True) for r in pair]
    arrival = build_method("lemoe", model, tokenizer, {**OPTS, "order": "arrival"})
    assert arrival.plan_batches(reqs, 3) == [reqs[0:3], reqs[3:6]]
    arrival.remove_hooks()
    method = build_method("lemoe", model, tokenizer, OPTS)
    emb = method.routing_embeddings([r.prompt for r in reqs])
    sim, same = emb @ emb.T, torch.tensor([[(i - j) % 2 == 0 for j in range(6)] for i in range(6)])
    assert sim[same].min() > sim[~same].max() + 0.2  # the routing space really holds two groups
    # Each batch is one group: clusters in order of first arrival, members in arrival order.
    assert method.plan_batches(reqs, 3) == [cities, bees]


@pytest.mark.slow
def test_real_model_lifelong_run(smollm2, shared_data) -> None:
    from lemoe.data.loaders import zsre_record
    from lemoe.runner import Protocol, run_protocol

    model, tokenizer = smollm2
    import json

    records = json.loads((shared_data / "zsre" / "zsre_dev.json").read_text())[:5]
    requests = [zsre_record(r) for r in records]
    method = build_method("lemoe", model, tokenizer, {"lr": 2e-2})
    try:
        record = run_protocol(
            method,
            requests,
            Protocol(edits=5, edits_per_step=1),
            Evaluator(model, tokenizer),
            progress=False,
            evaluate_pre=False,
        )
        routed = method.route_prompts([r.prompt for r in requests]).tolist()
    finally:
        method.remove_hooks()
    agg = record["aggregate"]
    assert agg["reliability.token_acc"] >= 0.95
    assert agg["locality.agreement"] >= 0.99
    assert routed == [0, 1, 2, 3, 4]


def test_span_scores_slide_a_subject_over_the_prompt() -> None:
    from lemoe.methods.lemoe.router import per_key, route_spans, span_scores, span_slots

    g = torch.Generator().manual_seed(0)
    vocab = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=-1)
    slots, key, offset = span_slots([vocab[[2, 3]], vocab[[7]]], first_key=5)
    assert key.tolist() == [5, 5, 6] and offset.tolist() == [1, 0, 0]
    q = torch.stack([vocab[[0, 1, 2, 3, 4]], vocab[[3, 9, 9, 9, 9]], vocab[[0, 7, 1, 1, 1]]])
    valid = torch.ones(3, 5, dtype=torch.bool)
    scores, keys = span_scores(q, valid, slots, key, offset)
    assert keys.tolist() == [5, 6]
    assert scores[0, 0] == pytest.approx(1.0)  # the two-token subject, anywhere in the prompt
    assert scores[1, 0] < 0.5  # its last token alone, at the start: the window runs off (-1)
    assert scores[2, 1] == pytest.approx(1.0)
    valid[2, 1] = False  # a token outside the prompt (e.g. the answer) never matches
    assert span_scores(q, valid, slots, key, offset)[0][2, 1] < 0.9
    expert = per_key(torch.tensor([0, 0, 1]), key, keys)
    threshold = torch.tensor([0.9, 0.9])
    assert route_spans(scores, threshold, expert).tolist() == [0, NULL, 1]
    assert route_spans(scores, None, expert)[1] != NULL  # no null route: always some expert


@pytest.mark.slow
def test_subject_keys_route_paraphrases_not_neighbours_on_smollm2(smollm2) -> None:
    model, tokenizer = smollm2
    method = build_method("lemoe", model, tokenizer, {"steps": 1, "extra_steps": 0})
    try:
        method.apply(
            [
                EditRequest(
                    prompt="The mother tongue of Danielle Darrieux is",
                    target_new="Klingon",
                    subject="Danielle Darrieux",
                )
            ]
        )
        got = method.route_prompts(
            [
                "The mother tongue of Danielle Darrieux is",
                "Danielle Darrieux, a French actress, was born in",  # subject at the start
                "Last year I met Danielle Darrieux in Paris. She speaks",  # long unrelated prefix
                "The mother tongue of Jean Gabin is",  # same template, other subject
                "How do bees make honey?",
            ]
        )
        assert got.tolist() == [0, 0, 0, NULL, NULL]
        assert method.router.slot_threshold.max() <= 0.999 and method.router.slot_threshold.min() > 0
    finally:
        method.remove_hooks()


def test_prompt_keys_still_round_trip(tokenizer, tmp_path) -> None:
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, {**OPTS, "route_key": "prompt"})
    method.apply([EDITS[0]])
    method.save_pretrained(tmp_path / "a")
    fresh = tiny_model("llama")
    loaded = load_method(str(tmp_path / "a"), fresh, tokenizer)
    prompts = [EDITS[0].prompt, *UNRELATED]
    assert torch.equal(_logits(fresh, tokenizer, prompts), _logits(model, tokenizer, prompts))
    assert loaded.route_prompts(prompts).tolist() == [0, NULL, NULL]
    with pytest.raises(StateError):  # a prompt-keyed state is not loaded as a subject-keyed one
        build_method("lemoe", tiny_model("llama"), tokenizer, OPTS).load_state_dict(
            method.state_dict(), method.state_meta()
        )


def test_train_prefixes_learn_the_edit_behind_unrelated_context(tokenizer) -> None:
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, {**OPTS, "train_prefixes": 2, "steps": 80})
    report = method.apply([EDITS[0]])
    assert report.info["accuracy"] == 1.0  # every variant (bare + 2 prefixed) predicts the target
    assert method.n_experts == 1 and method.route_prompts([EDITS[0].prompt]).tolist() == [0]
    with pytest.raises(ValueError, match="train_prefixes"):
        build_method("lemoe", tiny_model("llama"), tokenizer, {**OPTS, "train_prefixes": -1})


def test_experts_stored_in_bfloat16_still_edit_and_round_trip(tokenizer, tmp_path) -> None:
    model = tiny_model("llama")
    prompts = [EDITS[0].prompt, *UNRELATED]
    base = _logits(model, tokenizer, prompts)
    method = build_method("lemoe", model, tokenizer, {**OPTS, "expert_dtype": "bfloat16"})
    method.apply([EDITS[0]])
    method.apply([EDITS[1]])
    assert method.bank.w1.dtype == torch.bfloat16 and method.bank.w1.shape[0] == 2
    after = _logits(model, tokenizer, prompts)
    assert torch.equal(after[1:], base[1:])
    # the edit is active (its first target token predicted; on this tiny random model, whose logits
    # lie about one unit apart, rounding costs the later tokens), and storage is all that differs:
    # the same experts trained and kept in float32, rounded
    pairs = encode_pairs(tokenizer, [EDITS[0].prompt], [EDITS[0].target_new])
    (pred,), _ = teacher_forced_predictions(model, tokenizer, pairs, context=method.forward_context)
    assert int(pred[0]) == pairs[0].answer_ids[0]
    reference = build_method("lemoe", tiny_model("llama"), tokenizer, OPTS)
    reference.apply([EDITS[0]])
    reference.apply([EDITS[1]])
    for k, v in reference.bank.tensors().items():
        assert v.dtype == torch.float32 and torch.equal(v.to(torch.bfloat16), method.bank.tensors()[k])
    assert reference.bank.w1.element_size() == 2 * method.bank.w1.element_size()
    method.save_pretrained(tmp_path / "bf16")
    fresh = tiny_model("llama")
    loaded = load_method(str(tmp_path / "bf16"), fresh, tokenizer)
    assert loaded.bank.w1.dtype == torch.bfloat16
    assert torch.equal(_logits(fresh, tokenizer, prompts), after)
    with pytest.raises(ValueError, match="expert_dtype"):
        build_method("lemoe", tiny_model("llama"), tokenizer, {**OPTS, "expert_dtype": "int8"})


def test_hnsw_route_index_gives_the_exact_decisions(tokenizer) -> None:
    pytest.importorskip("faiss")
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, {**OPTS, "route_index": "hnsw", "route_index_min_slots": 1})
    for edit in EDITS:
        method.apply([edit])
    prompts = [r.prompt for r in EDITS] + UNRELATED
    assert method.route_prompts(prompts).tolist() == [0, 1, 2, NULL, NULL]
    assert method.router.index is not None and method.router.index.size == method.router.size
    method.rollback(1)
    assert method.route_prompts(prompts).tolist() == [0, NULL, 1, NULL, NULL]


def test_a_replica_keeps_its_hnsw_index_across_publishes_of_an_appended_state(tokenizer) -> None:
    pytest.importorskip("faiss")
    opts = {**OPTS, "route_index": "hnsw", "route_index_min_slots": 1}
    model = tiny_model("llama")
    writer = build_method("lemoe", model, tokenizer, opts)
    replica = build_method("lemoe", model, tokenizer, opts)
    writer.apply([EDITS[0]])
    writer.apply([EDITS[1]])
    replica.load_state_dict(writer.state_dict(), writer.state_meta())  # shares the writer's tensors
    prompts = [r.prompt for r in EDITS] + UNRELATED
    assert replica.route_prompts(prompts).tolist() == [0, 1, NULL, NULL, NULL]
    index = replica.router.index
    writer.apply([EDITS[2]])
    replica.load_state_dict(writer.state_dict(), writer.state_meta())
    assert replica.router.index is index  # grown, not rebuilt
    assert replica.route_prompts(prompts).tolist() == [0, 1, 2, NULL, NULL]
    assert index.size == replica.router.size
    writer.rollback(0)  # not an append: the next load builds a fresh index
    replica.load_state_dict(writer.state_dict(), writer.state_meta())
    assert replica.router.index is None
    assert replica.route_prompts(prompts).tolist() == [NULL, 0, 1, NULL, NULL]
