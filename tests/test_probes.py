"""The evaluator's extra probe kinds (locality_plus, same_subject, chat, fluency) on a tiny model.

Scores are pinned where they must be exact: the unedited model agrees with its own reference (1),
a forward context that moves every argmax agrees with nothing (0), a context that forces the
target's tokens makes the chat reply match (1).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch

from lemoe import tokens
from lemoe.cli import build_parser
from lemoe.cli.run import probes_from_args
from lemoe.data import load_requests, load_spec
from lemoe.data.probes import SAME_SUBJECT_TEMPLATES, control_text, same_subject_prompts
from lemoe.evaluation import ALL_PROBES, Evaluator, scorers
from lemoe.evaluation.evaluator import partner_statements, statement
from lemoe.methods import build_method
from lemoe.requests import EditRequest, InvalidRequestError, Probe
from lemoe.runner import Protocol, RunCheckpoint, format_table, run_protocol
from lemoe.testing import tiny_model

FT_FAST = {"lr": 0.05, "steps": 8, "layer": 2}
# EditRequest(prompt="The CEO of Acme is", target_new="Jane Doe", subject="Acme").content_hash()
# computed before EditRequest had a same_subject field
HASH_BEFORE_SAME_SUBJECT = "fdac477788dc2ee3b966eee9489abb9446567ae0d8f4cfee016f325da130430d"


def _requests() -> list[EditRequest]:
    return [
        EditRequest(
            prompt="The capital of France is",
            target_new="Rome",
            subject="France",
            paraphrases=("France's capital city is",),
            locality=(Probe("The sky is", "blue"),),
            same_subject=("France is located in", "The mother tongue of France is"),
        ),
        EditRequest(
            prompt="The CEO of Acme is",
            target_new="Jane Doe",
            subject="Acme",
            locality=(Probe("Cats are", "mammals"), Probe("Dogs are", "loyal")),
            same_subject=same_subject_prompts("Acme", ["The CEO of Acme is"]),
        ),
        EditRequest(prompt="Water boils at", target_new="50 degrees", locality=(Probe("Grass is", "green"),)),
    ]


class Forced:
    """A forward context adding a large bias to one token id at the LM head on each forward call:
    call t of a pass gets ``script[min(t, len - 1)]``, so a greedy generation spells ``script``
    and a constant script moves every argmax to that token."""

    def __init__(self, model: torch.nn.Module, script: Sequence[int]) -> None:
        self.model, self.script = model, list(script)

    def __call__(self, _prompt_mask: torch.Tensor) -> AbstractContextManager[None]:
        return self._hooked()

    @contextmanager
    def _hooked(self) -> Iterator[None]:
        step = [0]

        def hook(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            token = self.script[min(step[0], len(self.script) - 1)]
            step[0] += 1
            out = out.clone()
            out[..., token] += 1e4
            return out

        handle = self.model.get_output_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _sample_means(samples: Sequence[dict], request_id: str) -> dict[str, float]:
    """A request's '<probe>.<scorer>' keys recomputed as the means of its samples' scores."""
    values: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        if sample["request_id"] == request_id:
            for scorer, x in sample["scores"].items():
                values[f"{sample['probe']}.{scorer}"].append(x)
    return {k: sum(xs) / len(xs) for k, xs in values.items()}


GENERATING = {"chat_reliability", "chat_generality", "fluency"}  # with exact_match, also these:
EXACT_MATCH_GENERATING = {"reliability", "generality", "locality", "portability", "same_subject"}


def _assert_samples_are_the_scored(res, reqs: Sequence[EditRequest], *, exact_match: bool) -> None:
    """Every per-request number is the mean of that request's samples; the fields are as promised."""
    ids = [r.request_id for r in reqs]
    assert [ids.index(s["request_id"]) for s in res.samples] == sorted(ids.index(s["request_id"]) for s in res.samples)
    for r, scores in zip(reqs, res.per_request, strict=True):
        assert _sample_means(res.samples, r.request_id) == scores  # exactly: the very values averaged
    generating = GENERATING | (EXACT_MATCH_GENERATING if exact_match else set())
    outputs: list[dict[str, list[str]]] = [defaultdict(list) for _ in reqs]
    for s in res.samples:
        assert set(s) == {"request_id", "probe", "chat", "prompt", "answer", "reference", "generated", "scores"}
        assert s["chat"] == s["probe"].startswith("chat_")
        assert (s["generated"] is not None) == (s["probe"] in generating), s
        assert (s["answer"] is None) == (s["probe"] == "fluency")
        assert all(isinstance(x, float) for x in s["scores"].values()) and s["scores"]
        if "generation_agreement" in s["scores"]:  # the text compared is kept, and it is the one compared
            assert s["scores"]["generation_agreement"] == float(scorers.natural_stop(s["generated"]) == s["reference"])
        else:
            assert s["reference"] is None
        if s["probe"] in {"chat_reliability", "chat_generality", "fluency"}:
            outputs[ids.index(s["request_id"])][s["probe"]].append(s["generated"])
    assert [dict(o) for o in outputs] == res.outputs  # the generated texts are the kept outputs
    json.dumps(res.samples, allow_nan=False)


# -- requests, templates, loaders --------------------------------------------------------------------


def test_content_hash_ignores_same_subject_probes() -> None:
    r = EditRequest(prompt="The CEO of Acme is", target_new="Jane Doe", subject="Acme")
    assert r.content_hash() == HASH_BEFORE_SAME_SUBJECT
    assert "same_subject" not in r.to_dict()
    with_probes = EditRequest(prompt=r.prompt, target_new=r.target_new, subject="Acme", same_subject=["Acme works for"])
    assert with_probes.content_hash() == r.content_hash()  # derived probes do not rename the edit
    assert EditRequest.from_dict(with_probes.to_dict()) == with_probes
    assert with_probes.same_subject == ("Acme works for",)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"same_subject": "Acme was born in"}, "same_subject must be a list"),
        ({"same_subject": [""]}, r"same_subject\[0\] is empty"),
        ({"same_subject": ["ok", 3]}, r"same_subject\[1\] must be a string"),
    ],
)
def test_malformed_same_subject_is_rejected(fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        EditRequest.from_dict({"prompt": "The CEO of Acme is", "target_new": "Jane Doe", **fields}, where="rec 3")


def test_same_subject_templates_drop_the_edited_relation() -> None:
    born = same_subject_prompts("Ada Lovelace", ["Ada Lovelace was born in"])
    assert not any("born" in p for p in born)
    assert len(born) == 4 and all("Ada Lovelace" in p for p in born)
    # the first four of the fixed order, birthplace dropped
    assert born == tuple(t.format("Ada Lovelace") for _, t, _ in SAME_SUBJECT_TEMPLATES[1:5])
    # a paraphrase's keywords count too; matching is on the lower-cased text
    lang = same_subject_prompts("Ada", ["Ada writes in", "The LANGUAGE Ada used is"])
    assert "The mother tongue of Ada is" not in lang
    city = same_subject_prompts("Paris", ["Paris is the capital of"])
    assert "Paris is located in" not in city and "Paris was born in" in city
    assert same_subject_prompts(None, ["x"]) == () and same_subject_prompts("", ["x"]) == ()
    assert len({name for name, _, _ in SAME_SUBJECT_TEMPLATES}) == len(SAME_SUBJECT_TEMPLATES) == 10


def test_loaders_derive_same_subject_and_keep_an_explicit_one(tmp_path) -> None:
    reqs, _ = load_spec("zsre:sample")
    assert all(r.subject and 1 <= len(r.same_subject) <= 4 for r in reqs)
    assert all(r.subject in p for r in reqs for p in r.same_subject)
    # "What is the product made by UniFirst?": the owner/maker template is left out
    assert not any("owned by" in p for p in reqs[0].same_subject)
    rec = {"case_id": 1, "prompt": "Acme, by", "target_new": "Sega", "subject": "Acme", "same_subject": ["Acme is"]}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    assert load_requests("counterfact", path)[0].same_subject == ("Acme is",)


@pytest.mark.parametrize("bad", ["Acme was born in", [""], [1]])
def test_malformed_same_subject_in_a_data_file_names_the_record(tmp_path, bad) -> None:
    good = {"src": "Who founded Acme?", "alt": "Bob", "answers": ["Ann"], "subject": "Acme"}
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([good, {**good, "same_subject": bad}]))
    with pytest.raises(InvalidRequestError, match=r"zsre.json\[1\].*same_subject"):
        load_requests("zsre", path)
    lines = [{"prompt": "Sky is", "target_new": "green"}, {"prompt": "Acme is", "target_new": "x", "same_subject": bad}]
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(InvalidRequestError, match=r"edits.jsonl\[1\].*same_subject"):
        load_requests("jsonl", path)


# -- scorers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "answer", "expected"),
    [
        ("Sure! The capital of France is Rome.", "Rome", 1.0),
        ("rome", "Rome", 1.0),
        ("It is the U.S. Army, I think", "U.S. Army", 1.0),
        ("Romeo and Juliet", "Rome", 0.0),  # word boundaries
        ("The answer is Paris", "Rome", 0.0),
        ("", "Rome", 0.0),
        ("the the", "The", 0.0),  # an answer of only articles is never contained
    ],
)
def test_contains_is_normalised_containment_at_word_boundaries(generation: str, answer: str, expected: float) -> None:
    assert scorers.contains([generation], [answer]) == [expected]


def test_ngram_entropy_by_hand() -> None:
    assert scorers.ngram_entropy("the the the the the the") == 0.0
    k = 8
    distinct = " ".join(f"w{i}" for i in range(k))  # k-1 distinct bigrams, k-2 distinct trigrams
    assert scorers.ngram_entropy(distinct) == pytest.approx((2 / 3 * math.log2(k - 1) + 4 / 3 * math.log2(k - 2)) / 2)
    # "a b a b a": bigrams ab, ba, ab, ba (H2 = 1 bit); trigrams aba, bab, aba (H3 = H(2/3, 1/3))
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert scorers.ngram_entropy("a b\na  b a") == pytest.approx((2 / 3 * 1 + 4 / 3 * h3) / 2)
    assert scorers.ngram_entropy("") == 0.0 and scorers.ngram_entropy("one") == 0.0


def test_control_text_is_packaged() -> None:
    words = control_text().split()
    assert 250 <= len(words) <= 350


# -- the evaluator ---------------------------------------------------------------------------------


def test_all_probe_kinds_have_their_keys_and_agree_with_the_reference(tokenizer) -> None:
    model = tiny_model("llama")
    reqs = _requests()
    ev = Evaluator(model, tokenizer, batch_size=4)
    ref = ev.reference(reqs)
    assert ref.partners == {
        reqs[0].request_id: statement(reqs[1]),
        reqs[1].request_id: statement(reqs[0]),
        reqs[2].request_id: statement(reqs[1]),
    }
    res = ev.evaluate(reqs, ref)
    agg = res.aggregate
    for key in (
        "locality_plus.agreement",
        "locality_plus_other.agreement",
        "same_subject.agreement",
        "same_subject.generation_agreement",
    ):
        assert agg[key] == 1.0, key  # the unedited model against its own reference
    for key in (
        "locality_plus.token_acc",
        "locality_plus_other.token_acc",
        "chat_reliability.contains",
        "chat_reliability.exact_match",
        "chat_generality.contains",
        "chat_generality.exact_match",
        "fluency.ngram_entropy",
    ):
        assert key in agg, key
    assert "same_subject.token_acc" not in agg
    assert agg["control.ppl"] == res.globals["control.ppl"] > 1.0
    assert "control.ppl" not in res.per_request[0]  # a global number, not a request's
    assert "chat_generality.contains" in res.per_request[0] and "chat_generality.contains" not in res.per_request[1]
    assert "fluency.ngram_entropy" not in res.per_request[2] and "same_subject.agreement" not in res.per_request[2]
    assert res.skipped == {"locality_plus_other": 0, "same_subject": 0}
    assert [sorted(o) for o in res.outputs] == [
        ["chat_generality", "chat_reliability", "fluency"],
        ["chat_reliability", "fluency"],
        ["chat_reliability"],
    ]
    assert len(res.outputs[0]["chat_generality"]) == 1 and len(res.outputs[1]["chat_reliability"]) == 1
    _assert_samples_are_the_scored(res, reqs, exact_match=True)
    first = [(s["probe"], s["prompt"], s["answer"]) for s in res.samples if s["request_id"] == reqs[0].request_id]
    assert first == [  # request 0's probes, in the order they were built
        ("reliability", "The capital of France is", "Rome"),
        ("generality", "France's capital city is", "Rome"),
        ("locality", "The sky is", "blue"),
        ("locality_plus", statement(reqs[0]) + "The sky is", "blue"),
        ("locality_plus_other", statement(reqs[1]) + "The sky is", "blue"),
        ("same_subject", "France is located in", ref.continuation["France is located in"].strip()),
        ("same_subject", "The mother tongue of France is", ref.continuation["The mother tongue of France is"].strip()),
        ("chat_reliability", "The capital of France is", "Rome"),  # the user message, not the template
        ("chat_generality", "France's capital city is", "Rome"),
        ("fluency", "France", None),
    ]
    loc = next(s for s in res.samples if s["probe"] == "locality")
    assert loc["reference"] == ref.generation[("The sky is", "blue")]
    assert set(loc["scores"]) == {"token_acc", "agreement", "generation_agreement"}
    assert {s["probe"]: set(s["scores"]) for s in res.samples if s["request_id"] == reqs[0].request_id} == {
        "reliability": {"token_acc", "exact_match"},
        "generality": {"token_acc", "exact_match"},
        "locality": {"token_acc", "agreement", "generation_agreement"},
        "locality_plus": {"token_acc", "agreement"},
        "locality_plus_other": {"token_acc", "agreement"},
        "same_subject": {"agreement", "generation_agreement"},
        "chat_reliability": {"contains", "exact_match"},
        "chat_generality": {"contains", "exact_match"},
        "fluency": {"ngram_entropy"},
    }
    # a later evaluation of one request of the stream builds the same texts (partner fixed in ref)
    alone = ev.evaluate(reqs[2:], ref)
    assert alone.aggregate["locality_plus_other.agreement"] == 1.0
    assert ev.evaluate(reqs, ref).aggregate == agg  # deterministic


def test_probes_can_be_turned_off(tokenizer) -> None:
    model = tiny_model("llama")
    reqs = _requests()
    ev = Evaluator(model, tokenizer, exact_match=False, probes=())
    res = ev.evaluate(reqs, ev.reference(reqs))
    assert not any(
        k.startswith(("locality_plus", "same_subject", "chat_", "fluency", "control")) for k in res.aggregate
    )
    assert res.globals == {} and res.skipped == {} and res.outputs == [{}, {}, {}]
    with pytest.raises(ValueError, match="unknown probe kind"):
        Evaluator(model, tokenizer, probes=("chat", "nope"))
    assert ALL_PROBES == ("locality_plus", "same_subject", "chat", "fluency")


def test_agreement_drops_to_zero_when_every_argmax_moves(tokenizer) -> None:
    model = tiny_model("llama")
    reqs = _requests()
    ev = Evaluator(model, tokenizer, batch_size=4)
    ref = ev.reference(reqs)
    token = 12345
    assert all(token not in a.tolist() for a in ref.argmax.values())  # the unedited model never predicts it
    res = ev.evaluate(reqs, ref, Forced(model, [token]))
    for key in (
        "locality.agreement",
        "locality_plus.agreement",
        "locality_plus_other.agreement",
        "same_subject.agreement",
        "same_subject.generation_agreement",
        "chat_reliability.contains",
        "chat_reliability.exact_match",
    ):
        assert res.aggregate[key] == 0.0, key
    assert res.aggregate["control.ppl"] > 1e3 * ev.evaluate(reqs, ref).aggregate["control.ppl"]
    assert res.aggregate["fluency.ngram_entropy"] == 0.0  # one token repeated
    _assert_samples_are_the_scored(res, reqs, exact_match=True)  # scores of 0 are the samples' too
    assert all(s["scores"]["agreement"] == 0.0 for s in res.samples if "agreement" in s["scores"])


def test_samples_without_exact_match_or_reference(tokenizer) -> None:
    model = tiny_model("llama")
    reqs = _requests()
    ev = Evaluator(model, tokenizer, exact_match=False, perplexity=True)
    res = ev.evaluate(reqs, None)  # no reference: no agreement, no same_subject, no locality_plus_other
    _assert_samples_are_the_scored(res, reqs, exact_match=False)
    assert {s["probe"] for s in res.samples} == {
        "reliability", "generality", "locality", "locality_plus", "chat_reliability", "chat_generality", "fluency",
    }  # fmt: skip
    rel = next(s for s in res.samples if s["probe"] == "reliability")
    assert set(rel["scores"]) == {"token_acc", "ppl"} and rel["generated"] is None
    assert all("agreement" not in s["scores"] for s in res.samples)
    assert ev.evaluate([], None).samples == []


def test_chat_reply_forced_to_the_target_matches(tokenizer) -> None:
    model = tiny_model("llama")
    reqs = [
        EditRequest(prompt="The capital of France is", target_new="Rome", paraphrases=("France's capital is",)),
        EditRequest(prompt="Which city hosts the Colosseum?", target_new="Rome"),
    ]
    script = tokenizer(" Rome", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ev = Evaluator(model, tokenizer, batch_size=8, probes=("chat",))
    res = ev.evaluate(reqs, None, Forced(model, script))
    for key in ("chat_reliability.contains", "chat_reliability.exact_match", "chat_generality.contains"):
        assert res.aggregate[key] == 1.0, key
    assert res.aggregate["chat_generality.exact_match"] == 1.0
    assert res.outputs[0] == {"chat_reliability": [" Rome"], "chat_generality": [" Rome"]}


def test_chat_prompt_is_templated_once_and_kept_text_is_the_generation(tokenizer) -> None:
    model = tiny_model("llama")
    req = EditRequest(prompt="The capital of France is", target_new="Rome")
    ids = tokens.chat_prompt_ids(tokenizer, req.prompt)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start  # no second BOS / turn marker
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    recorder = _Recorder()
    ev = Evaluator(model, tokenizer, probes=("chat",), chat_max_new_tokens=32)
    res = ev.evaluate([req], None, recorder)
    direct = scorers.greedy_generate(model, tokenizer, [ids], [32], stop_ids=ev._chat_stop_ids())
    assert res.outputs[0]["chat_reliability"] == tokenizer.batch_decode(direct, skip_special_tokens=True)
    assert len(direct[0]) <= 32
    # the generation pass marked the whole templated prompt as prompt
    assert any(m.shape == (1, len(ids)) and bool(m.all()) for m in recorder.masks)


class _Recorder:
    """A forward context that changes nothing and keeps the prompt masks it is given."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []

    @contextmanager
    def __call__(self, prompt_mask: torch.Tensor) -> Iterator[None]:
        self.masks.append(prompt_mask.clone())
        yield


def test_a_tokenizer_without_chat_template_is_refused_before_any_work(tokenizer) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="--skip-probe chat"):
        Evaluator(model, plain)
    ev = Evaluator(model, plain, probes=[p for p in ALL_PROBES if p != "chat"])
    assert "chat_reliability.contains" not in ev.evaluate(_requests()[:1]).aggregate


def test_control_perplexity_is_exp_of_the_mean_nll_by_hand(tokenizer) -> None:
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, probes=("fluency",))
    ids = tokenizer(control_text())["input_ids"]
    window = model.config.max_position_embeddings  # the text is longer than the tiny model's context
    assert len(ids) > window
    nll: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(ids), window):
            piece = torch.tensor([ids[i : i + window]])
            logp = torch.log_softmax(model(input_ids=piece).logits[0, :-1].float(), -1)
            nll.append(-logp.gather(-1, piece[0, 1:, None]).squeeze(-1))
    by_hand = math.exp(float(torch.cat(nll).mean()))
    assert ev.control_perplexity() == pytest.approx(by_hand, rel=1e-4)
    res = ev.evaluate(_requests(), None)
    assert res.aggregate["control.ppl"] == pytest.approx(by_hand, rel=1e-4)


def test_empty_unedited_continuations_are_skipped_and_counted(tokenizer) -> None:
    model = tiny_model("llama")
    reqs = _requests()
    ev = Evaluator(model, tokenizer, exact_match=False, probes=("same_subject",))
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    ref = ev.reference(reqs, Forced(model, [newline]))  # every continuation is an empty line
    res = ev.evaluate(reqs, ref)
    n = sum(len(r.same_subject) for r in reqs)
    assert n == 6 and res.skipped == {"same_subject": n}
    assert "same_subject.agreement" not in res.aggregate


def test_partners_and_a_stream_of_one(tokenizer) -> None:
    reqs = _requests()
    assert partner_statements(reqs[:1]) == {}
    assert partner_statements(reqs[:2]) == {
        reqs[0].request_id: statement(reqs[1]),
        reqs[1].request_id: statement(reqs[0]),
    }
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False, probes=("locality_plus",))
    one = reqs[1:2]
    res = ev.evaluate(one, ev.reference(one))
    assert "locality_plus.agreement" in res.aggregate and "locality_plus_other.agreement" not in res.aggregate
    assert res.skipped == {"locality_plus_other": 2}  # two locality probes without a partner


def test_absent_probes_are_said_once(tokenizer, caplog) -> None:
    model = tiny_model("llama")
    reqs = [EditRequest(prompt="Water boils at", target_new="50 degrees")]
    ev = Evaluator(model, tokenizer, exact_match=False)
    with caplog.at_level(logging.WARNING, logger="lemoe.evaluation.evaluator"):
        ev.evaluate(reqs, ev.reference(reqs))
        ev.evaluate(reqs, None)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no request has a subject" in m for m in messages) == 1
    assert sum("no request has same_subject" in m for m in messages) == 1
    assert sum("no request has locality" in m for m in messages) == 1
    assert sum("without a Reference" in m for m in messages) == 1


def test_all_probes_share_the_few_batched_passes(tokenizer, monkeypatch) -> None:
    calls = {"teacher": 0, "generate": 0}
    forced, generate = scorers.teacher_forced_predictions, scorers.greedy_generate

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(scorers, "teacher_forced_predictions", count("teacher", forced))
    monkeypatch.setattr(scorers, "greedy_generate", count("generate", generate))
    model = tiny_model("llama")
    reqs = _requests()
    ev = Evaluator(model, tokenizer)
    ref = ev.reference(reqs)
    assert calls == {"teacher": 1, "generate": 1}
    ev.evaluate(reqs, ref)
    assert calls == {"teacher": 2, "generate": 4}  # teacher forcing once; exact match, chat, fluency


def test_cli_skip_probe() -> None:
    args = build_parser().parse_args(["run", "--skip-probe", "chat", "--skip-probe", "fluency"])
    assert probes_from_args(args) == ("locality_plus", "same_subject")
    assert probes_from_args(build_parser().parse_args(["eval", "x"])) == ALL_PROBES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--skip-probe", "nope"])


# -- the runner ------------------------------------------------------------------------------------


def test_run_record_carries_the_new_keys_outputs_and_globals(tokenizer) -> None:
    reqs, _ = load_spec("zsre:sample")
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False)
    method = build_method("ft-l", model, tokenizer, FT_FAST)
    record = run_protocol(method, reqs, Protocol(edits=4, edits_per_step=2), ev, progress=False)
    agg = record["aggregate"]
    for key in (
        "locality_plus.agreement",
        "locality_plus_other.agreement",
        "same_subject.agreement",
        "chat_reliability.exact_match",
        "chat_generality.contains",
        "fluency.ngram_entropy",
        "control.ppl",
    ):
        assert key in agg, key
    assert record["pre_edit"]["control.ppl"] > 0 and record["pre_edit"]["same_subject.agreement"] == 1.0
    assert agg["control.ppl"] == record["timeline"][-1]["aggregate"]["control.ppl"]  # one chunk
    assert list(record["outputs"]) == [r.request_id for r in reqs[:4]]
    assert all({"chat_reliability", "chat_generality", "fluency"} <= set(o) for o in record["outputs"].values())
    ids = [s["request_id"] for s in record["samples"]]
    assert list(dict.fromkeys(ids)) == record["request_order"] and ids == sorted(ids, key=ids.index)
    for row in record["per_request"]:
        assert {"request_id": row["request_id"], **_sample_means(record["samples"], row["request_id"])} == row
    chat = [s for s in record["samples"] if s["chat"]]
    assert chat and [s["generated"] for s in chat if s["probe"] == "chat_reliability"] == [
        o["chat_reliability"][0] for o in record["outputs"].values()
    ]
    assert record["skipped_probes"] == {"locality_plus_other": 0, "same_subject": 0}
    assert {"contains", "ngram_entropy"} <= set(record["scorers"])
    table = format_table(record)
    for column in ("Loc+", "Loc+o", "Subj", "Chat EM", "ChatG EM", "Entropy", "Ctl ppl"):
        assert column in table, column
    json.dumps(record)


def test_outputs_and_globals_survive_a_checkpoint_resume(tokenizer, tmp_path) -> None:
    reqs, _ = load_spec("zsre:sample")
    model = tiny_model("llama")
    ev = Evaluator(model, tokenizer, exact_match=False, probes=("chat", "fluency"))
    method = build_method("ft-l", model, tokenizer, FT_FAST)
    protocol = Protocol(edits=4, edits_per_step=1, chunk=2)
    uncut = run_protocol(method, reqs, protocol, ev, progress=False)

    seen: list[dict] = []

    def cut_in_the_last_step(entry: dict) -> None:
        seen.append(entry)
        if len(seen) == 4:
            raise RuntimeError("cut")

    ckpt = RunCheckpoint(tmp_path / "ck", every=1)
    with pytest.raises(RuntimeError, match="cut"):
        run_protocol(method, reqs, protocol, ev, progress=False, on_step=cut_in_the_last_step, checkpoint=ckpt)
    resumed = run_protocol(method, reqs, protocol, ev, progress=False, checkpoint=ckpt)
    assert resumed["resumed_from"] == {"chunk": 1, "step": 1}  # chunk 0's final evaluation came from the log
    assert resumed["outputs"] == uncut["outputs"] and len(resumed["outputs"]) == 4
    assert resumed["samples"] == uncut["samples"]  # chunk 0's from the checkpoint log, chunk 1's evaluated
    assert {s["request_id"] for s in resumed["samples"]} == set(resumed["request_order"])
    saved = json.loads((tmp_path / "ck" / "progress.json").read_text())["log"]["final_samples"]
    assert sorted(saved) == sorted(resumed["request_order"])  # the finished run's log holds all four
    for row in resumed["per_request"]:
        assert {"request_id": row["request_id"], **_sample_means(resumed["samples"], row["request_id"])} == row
    assert resumed["aggregate"]["control.ppl"] == pytest.approx(uncut["aggregate"]["control.ppl"], rel=1e-6)
    assert resumed["pre_edit"]["control.ppl"] == uncut["pre_edit"]["control.ppl"]
    ckpt.clear()
