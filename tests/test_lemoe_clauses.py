"""LEMoE clause gating: clause splitting, the final run, and where the expert acts (tiny models)."""

from __future__ import annotations

import pytest
import torch

from lemoe.methods import build_method
from lemoe.methods.lemoe import segments, wording
from lemoe.methods.lemoe.router import NULL
from lemoe.requests import EditRequest
from lemoe.testing import tiny_model

OPTS = {"layer": 2, "steps": 60, "lr": 3e-2, "train_chat": False, "context_keys": False}
ACME = EditRequest(prompt="The chief executive of Acme Widgets is", target_new="Quux", subject="Acme Widgets")
ZORB = EditRequest(prompt="The home town of Zorbulon Vexx is", target_new="Flarn", subject="Zorbulon Vexx")


@pytest.fixture(scope="module")
def classes(tokenizer):
    return segments.token_classes(tokenizer, len(tokenizer))


def _clauses(tokenizer, classes, text: str) -> list[tuple[str, int, bool]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    seg, content = segments.clause_segments(x, torch.ones_like(x, dtype=torch.bool), classes)
    return [(tokenizer.decode([i]), int(s), bool(c)) for i, s, c in zip(ids, seg[0], content[0], strict=True)]


def test_clauses_split_at_sentence_ends_not_abbreviations(tokenizer, classes) -> None:
    rows = _clauses(tokenizer, classes, "Acme is big. The U.S. Army is based in")
    stop = [t for t, _, _ in rows].index(".") + 1
    assert [s for _, s, _ in rows] == [0] * stop + [1] * (len(rows) - stop)  # "U.S." ends no clause
    rows = _clauses(tokenizer, classes, "Its chief is Jane Doe. The capital of France is")
    assert rows[-1][1] == 1  # "Do" + "e" + ".": a word ends there, not an initial
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who leads Acme?"}], tokenize=False, add_generation_prompt=True
    )
    rows = _clauses(tokenizer, classes, chat)
    start = chat.index("Who leads Acme?")  # its tokens, by offset (whatever the vocabulary splits)
    offsets = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    question = [s for (_, s, _), (a, b) in zip(rows, offsets, strict=True) if start <= a < b <= start + 14]
    assert len(question) >= 3 and len(set(question)) == 1  # "Who leads Acme" is one clause
    tail = rows[rows.index(next(r for r in rows if r[0] == "?")) + 1 :]
    assert all(not c for t, _, c in tail if t.strip() not in ("ass", "istant"))  # template, not content


def test_final_run_gets_its_opening_clause_expert_only() -> None:
    # clauses: 0 own match (expert 3), 1 content without match, 2 own match (expert 5), 3 empty
    choice = torch.tensor([[3, NULL, 5, NULL], [3, NULL, NULL, NULL], [NULL, NULL, 4, NULL]])
    content = torch.tensor([[5, 5, 4, 0], [5, 5, 1, 0], [5, 0, 1, 1]])
    last = torch.tensor([3, 2, 3])
    gate, opening = segments.gate_by_clause(choice, content, last, min_content=3)
    assert gate.tolist() == [[NULL, NULL, 5, 5], [NULL, NULL, NULL, NULL], [NULL, NULL, 4, 4]]
    assert opening.tolist() == [2, -1, 2]


def test_preservation_prompts_leave_out_the_edited_relation() -> None:
    req = EditRequest(prompt="Acme Widgets was founded in the year", target_new="1999", subject="Acme Widgets")
    prompts = wording.preservation_prompts(req, 20)
    assert prompts and all("Acme Widgets" in p for p in prompts)
    assert not any("founded" in p for p in prompts)
    assert wording.preservation_prompts(EditRequest(prompt="No subject here", target_new="x"), 3) == []


def _answer_logits(model, tokenizer, text: str, answer: str) -> torch.Tensor:
    p = tokenizer(text)["input_ids"]
    a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : len(p) - 1 + len(a)]


@pytest.mark.parametrize("positions", ["run", "subject"])
def test_an_earlier_edited_statement_leaves_a_later_question_alone(tokenizer, positions: str) -> None:
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, {**OPTS, "expert_positions": positions})
    question, answer = "Please write a short poem about the sea and", "waves"
    with method.disabled():
        base = _answer_logits(model, tokenizer, question, answer)
        base_plus = _answer_logits(model, tokenizer, f"{ACME.prompt} Quux. {question}", answer)
    method.apply([ACME])
    plus = _answer_logits(model, tokenizer, f"{ACME.prompt} Quux. {question}", answer)
    assert torch.equal(plus, base_plus)  # the earlier clause is not in the final run: bit-identical
    assert torch.equal(_answer_logits(model, tokenizer, question, answer), base)
    assert method.route_prompts([ACME.prompt, f"{ACME.prompt} Quux. {question}"]).tolist() == [0, NULL]


def test_two_edited_facts_in_one_text_are_each_answered(tokenizer) -> None:
    model = tiny_model("llama")  # a random tiny model reads a subject edit through attention poorly:
    method = build_method("lemoe", model, tokenizer, {**OPTS, "expert_positions": "run"})  # see below
    method.apply([ACME])
    method.apply([ZORB])
    for first, second in ((ACME, ZORB), (ZORB, ACME)):
        text = f"{first.prompt} {first.target_new}. {second.prompt}"
        ids = _answer_logits(model, tokenizer, text, second.target_new).argmax(-1)
        want = tokenizer(" " + second.target_new, add_special_tokens=False)["input_ids"]
        assert ids.tolist() == want
    assert method.route_prompts([f"{ACME.prompt} Quux. {ZORB.prompt}"]).tolist() == [1]


def test_sequence_gate_keeps_the_old_whole_sequence_decision(tokenizer) -> None:
    model = tiny_model("llama")
    method = build_method("lemoe", model, tokenizer, {**OPTS, "gate": "sequence"})
    method.apply([ACME])
    assert method.route_prompts([f"{ACME.prompt} Quux. How do bees make honey?"]).tolist() == [0]


def test_chat_wording_trains_the_edit_as_a_user_question(tokenizer) -> None:
    model = tiny_model("llama")
    # context_keys (the default): the subject is also keyed as read inside the chat template; without
    # those keys, whether a random tiny model routes the chat to the expert is luck
    opts = {**OPTS, "train_chat": True, "steps": 120, "expert_positions": "run", "context_keys": True}
    method = build_method("lemoe", model, tokenizer, opts)
    method.apply([ACME])
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": ACME.prompt}]  # chat_system=""
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    want = tokenizer(" " + ACME.target_new, add_special_tokens=False)["input_ids"]
    prompt = torch.tensor([[True] * len(ids) + [False] * len(want)])  # teacher forcing, as the evaluator
    with torch.no_grad(), method.forward_context(prompt):  # does: the answer is not a clause of its own
        logits = model(input_ids=torch.tensor([ids + want])).logits[0, len(ids) - 1 : -1]
    assert logits.argmax(-1).tolist() == want
    assert method.route_prompts([chat]).tolist() == [0]  # the template's tail continues the question


@pytest.mark.slow
def test_real_model_edit_leaves_a_later_question_alone_and_two_facts_hold(smollm2) -> None:
    """SmolLM2, defaults: after an edit about one subject, an unrelated question placed after the
    edit's own statement keeps the unedited answer exactly; two edited facts in one text are each
    answered by their own expert."""
    model, tok = smollm2
    acme = EditRequest(prompt="The chief executive of Acme Widgets is", target_new="Jane Doe", subject="Acme Widgets")
    zorb = EditRequest(prompt="Zorbulon Vexx was born in the city of", target_new="Lisbon", subject="Zorbulon Vexx")
    method = build_method("lemoe", model, tok, {})
    try:
        question, answer = "The capital of France is", "Paris"
        text = f"{acme.prompt} {acme.target_new}. {question}"
        with method.disabled():
            base = _answer_logits(model, tok, text, answer)
        method.apply([acme])
        method.apply([zorb])
        assert torch.equal(_answer_logits(model, tok, text, answer), base)
        for first, second in ((acme, zorb), (zorb, acme)):
            both = f"{first.prompt} {first.target_new}. {second.prompt}"
            got = _answer_logits(model, tok, both, second.target_new).argmax(-1).tolist()
            assert got == tok(" " + second.target_new, add_special_tokens=False)["input_ids"], both
    finally:
        method.remove_hooks()
