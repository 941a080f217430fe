"""Scorers against hand-computed values, and padding/batching invariance on real model code."""

from __future__ import annotations

import math

import pytest
import torch

from lemoe import tokens
from lemoe.evaluation import Evaluator, scorers
from lemoe.requests import EditRequest, Probe
from lemoe.testing import tiny_model


def test_token_accuracy_by_hand() -> None:
    pairs = [tokens.Encoded((1, 2), (5, 6, 7)), tokens.Encoded((1,), (9,))]
    argmax = [torch.tensor([5, 0, 7]), torch.tensor([3])]
    assert scorers.token_accuracy(argmax, pairs) == pytest.approx([2 / 3, 0.0])


def test_agreement_and_perplexity_by_hand() -> None:
    assert scorers.agreement([torch.tensor([1, 2, 3, 4])], [torch.tensor([1, 0, 3, 0])]) == [0.5]
    lp = torch.log(torch.tensor([0.5, 0.25]))
    # ppl = exp(-(log .5 + log .25)/2) = sqrt(8)
    assert scorers.perplexity([lp])[0] == pytest.approx(math.sqrt(8))


@pytest.mark.parametrize(
    ("generation", "answer", "expected"),
    [
        (" Paris. It is big", "Paris", 1.0),
        ("Paris", "paris", 1.0),
        (" Parisian", "Paris", 0.0),
        (" U.S. Army.", "U.S. Army", 1.0),
        (" Paris is nice", "Paris", 0.0),
        (" London", "Paris", 0.0),
        (" the Beatles\n", "The Beatles", 1.0),
    ],
)
def test_exact_match_natural_stop(generation: str, answer: str, expected: float) -> None:
    assert scorers.exact_match([generation], [answer]) == [expected]


def test_natural_stop() -> None:
    assert scorers.natural_stop(" Paris. It") == " Paris"
    assert scorers.natural_stop(" a\nb") == " a"
    assert scorers.normalise_answer("The  U.S. Army!") == "us army"


def _manual_argmax(model, prompt_ids, answer_ids):
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0]
    n_p = len(prompt_ids)
    return logits[n_p - 1 : n_p - 1 + len(answer_ids)].argmax(-1), torch.log_softmax(logits, -1)[
        torch.arange(n_p - 1, n_p - 1 + len(answer_ids)), torch.tensor(answer_ids)
    ]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_teacher_forcing_is_padding_invariant(family: str, tokenizer) -> None:
    """Batched, right-padded scoring equals one-sequence-at-a-time scoring."""
    model = tiny_model(family)
    prompts = ["The capital of France is", "Who", "A much longer prompt about many different things is"]
    answers = ["Paris", "the quick brown fox", "x"]
    pairs = tokens.encode_pairs(tokenizer, prompts, answers)
    argmax, logprob = scorers.teacher_forced_predictions(model, tokenizer, pairs, batch_size=3)
    for p, a, lp in zip(pairs, argmax, logprob, strict=True):
        ref_a, ref_lp = _manual_argmax(model, list(p.prompt_ids), list(p.answer_ids))
        assert torch.equal(a, ref_a)
        assert torch.allclose(lp, ref_lp, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_is_padding_invariant(family: str, tokenizer) -> None:
    model = tiny_model(family)
    prompts = [tokenizer(p).input_ids for p in ["Hello there my friend", "Hi", "One two three four five six"]]
    batched = scorers.greedy_generate(model, tokenizer, prompts, [4, 4, 4], batch_size=3)
    for p, b in zip(prompts, batched, strict=True):
        single = scorers.greedy_generate(model, tokenizer, [p], [4], batch_size=1)[0]
        ids = torch.tensor([p])
        hf = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(p) :].tolist()
        assert b == single
        eos = tokenizer.eos_token_id
        assert b == (hf[: hf.index(eos)] if eos in hf else hf)


def test_evaluator_keys_and_reference(tokenizer) -> None:
    model = tiny_model("llama")
    reqs = [
        EditRequest(
            prompt="The capital of France is",
            target_new="Rome",
            paraphrases=("France's capital is",),
            locality=(Probe("The sky is", "blue"),),
        ),
        EditRequest(prompt="Water boils at", target_new="50 degrees", locality=(Probe("Cats are", "mammals"),)),
    ]
    ev = Evaluator(model, tokenizer, batch_size=2)
    ref = ev.reference(reqs)
    res = ev.evaluate(reqs, ref)
    # unedited model vs its own reference: locality agreement is exactly 1
    assert res.aggregate["locality.agreement"] == 1.0
    assert res.aggregate["locality.generation_agreement"] == 1.0
    assert set(res.per_request[1]) >= {"reliability.token_acc", "reliability.exact_match", "locality.agreement"}
    assert "generality.token_acc" not in res.per_request[1]  # no paraphrase: not scored, not zero
    assert 0.0 <= res.aggregate["reliability.token_acc"] <= 1.0
    # the evaluator is deterministic
    assert ev.evaluate(reqs, ref).aggregate == res.aggregate
