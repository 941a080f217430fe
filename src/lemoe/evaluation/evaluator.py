"""The evaluator: turns requests into probes, runs the scorers in a few big batches, aggregates.

Metric keys are ``<metric>.<scorer>``:

- ``reliability.token_acc`` / ``reliability.exact_match`` (/ ``reliability.ppl``): the edit prompt;
- ``generality.*``: the paraphrases (mean over a request's paraphrases);
- ``portability.token_acc``: portability probes;
- ``locality.agreement``: teacher-forced argmax unchanged versus the unedited model (WISE/EasyEdit
  "Loc"); ``locality.token_acc``: absolute accuracy on the locality answer ("specificity");
  ``locality.generation_agreement``: greedy continuation unchanged versus the unedited model.

Probe kinds beyond those, chosen with ``Evaluator(probes=...)`` (all on by default, see
:data:`ALL_PROBES`):

- ``locality_plus``: each locality prompt preceded by the edit's own statement
  (``"{prompt} {target_new}. {locality prompt}"``): ``locality_plus.agreement`` and
  ``locality_plus.token_acc``. An edit that leaks into whatever follows its own fact shows here
  and not in plain locality. ``locality_plus_other.agreement`` / ``.token_acc``: the same, after
  the statement of another edit of the stream (its partner, fixed in the :class:`Reference`).
- ``same_subject``: other facts about the edited subject (``EditRequest.same_subject``, from the
  templates of :mod:`lemoe.data.probes`), answered by the unedited model's own greedy continuation:
  ``same_subject.agreement`` (teacher-forced) and ``same_subject.generation_agreement``.
- ``chat``: the edit prompt and paraphrases as a user turn of the tokenizer's chat template, scored
  by free greedy generation (natural stop, ``chat_max_new_tokens`` at most):
  ``chat_reliability.contains`` / ``.exact_match`` and ``chat_generality.contains`` /
  ``.exact_match``. The generated texts are kept in :attr:`EvalResult.outputs`.
- ``fluency``: ``fluency.ngram_entropy`` of a free greedy generation from the subject alone (ROME's
  measure), and ``control.ppl``, the perplexity of a fixed packaged text, a global number (in
  :attr:`EvalResult.globals` and ``aggregate``, not per request).

Every scored probe is also kept as a sample (:attr:`EvalResult.samples`, see :data:`SAMPLE_FIELDS`):
what was asked, what was scored against, what the model generated, and its scores, the very values
the per-request means are taken over (nothing is recomputed for them).

Every agreement score, and the ``same_subject`` answers, need a :class:`Reference` taken from the
unedited model before the first edit. A probe kind whose fields no request has is absent (said once
per evaluator in the log); a probe that does not fit its record is skipped and counted in
:attr:`EvalResult.skipped`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lemoe.data.probes import control_text
from lemoe.evaluation import scorers
from lemoe.evaluation.kinds import ALL_PROBES
from lemoe.evaluation.scorers import ForwardContext, no_context
from lemoe.requests import EditRequest
from lemoe.tokens import Encoded, chat_prompt_ids, encode_pairs

log = logging.getLogger(__name__)

SAME_SUBJECT_NEW_TOKENS = 5  # the unedited model's answer to a same-subject prompt: a short phrase
FLUENCY_NEW_TOKENS = 32
CHAT_OPTION = "pass --skip-probe chat (Evaluator(probes=...) without 'chat')"

_BASE = frozenset({"reliability", "generality", "locality", "portability"})
_AGREEMENT = frozenset({"locality", "locality_plus", "locality_plus_other", "same_subject"})
# same_subject's answer is the unedited model's own continuation: accuracy on it is agreement
_NO_TOKEN_ACC = frozenset({"same_subject"})
_GENERATED = _BASE | {"same_subject"}  # scored by the exact-match generation pass


SAMPLE_FIELDS = {
    "request_id": "the request the probe belongs to",
    "probe": "the probe kind, the metric of its keys (reliability, generality, locality, locality_plus, ...)",
    "chat": "true when the prompt was sent as a user turn of the chat template (prompt is that message)",
    "prompt": "the prompt text (for locality_plus kinds, with the statement that precedes it)",
    "answer": "the teacher-forced / matched answer: the target, the dataset answer, or for same_subject the "
    "unedited model's continuation; null for fluency (free text, no answer)",
    "reference": "the unedited model's greedy continuation that generation_agreement compared with, else null "
    "(agreement compares token ids only)",
    "generated": "the decoded greedy generation of this probe when it had one (the exact-match, chat or fluency "
    "pass; before any natural stop), else null",
    "scores": "scorer -> value; the per-request '<probe>.<scorer>' numbers are means of these",
}


@dataclass
class Reference:
    """What the unedited model said, taken before the first edit.

    ``argmax``/``generation``: teacher-forced argmax and greedy continuation on the probes scored
    against the unedited model, keyed by (prompt, answer). ``continuation``: the greedy
    continuation of each same-subject prompt (its answer). ``partners``: request id -> the edit
    statement that precedes its locality prompts in ``locality_plus_other``.
    """

    argmax: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    generation: dict[tuple[str, str], str] = field(default_factory=dict)
    continuation: dict[str, str] = field(default_factory=dict)
    partners: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalResult:
    per_request: list[dict[str, float]]
    aggregate: dict[str, float]
    n_requests: int
    # per request, metric -> generated texts of its free-generation probes (chat, fluency)
    outputs: list[dict[str, list[str]]] = field(default_factory=list)
    # numbers about the model, not about a request (control.ppl); also merged into aggregate
    globals: dict[str, float] = field(default_factory=dict)
    # probe kind -> probes left out because they did not fit their record
    skipped: dict[str, int] = field(default_factory=dict)
    # one dict per scored probe (keys: SAMPLE_FIELDS), in request order, then probe order
    samples: list[dict[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class _Probe:
    request: int
    metric: str
    prompt: str
    answer: str
    prompt_ids: tuple[int, ...] | None = None  # already tokenised (a chat template's output)


@dataclass
class _Scored:
    """What scoring one probe produced: its scores, and the texts they were computed from."""

    scores: dict[str, float] = field(default_factory=dict)
    generated: str | None = None  # the decoded greedy generation, when the probe had one
    reference: str | None = None  # the unedited continuation generation_agreement compared with

    def sample(self, request_id: str, probe: _Probe) -> dict[str, object]:
        return {
            "request_id": request_id,
            "probe": probe.metric,
            "chat": probe.prompt_ids is not None,
            "prompt": probe.prompt,
            "answer": probe.answer or None,
            "reference": self.reference,
            "generated": self.generated,
            "scores": dict(self.scores),
        }


# -- probe building: one small pure function per kind ----------------------------------------------


def statement(request: EditRequest) -> str:
    """The edit written out as a sentence, to precede another prompt."""
    return f"{request.prompt} {request.target_new}. "


def partner_statements(stream: Sequence[EditRequest]) -> dict[str, str]:
    """Request id -> the statement of its partner: element i-1 of the stream, element 1 for
    element 0. Every prefix of the stream then holds the partners of its members, so evaluating
    the edits done so far never needs an edit not yet applied. A stream of one has no partner."""
    out: dict[str, str] = {}
    for i, r in enumerate(stream):
        j = i - 1 if i > 0 else 1
        if j < len(stream):
            out.setdefault(r.request_id, statement(stream[j]))
    return out


def _base_probes(requests: Sequence[EditRequest]) -> list[_Probe]:
    out: list[_Probe] = []
    for i, r in enumerate(requests):
        out.append(_Probe(i, "reliability", r.prompt, r.target_new))
        out.extend(_Probe(i, "generality", p, r.target_new) for p in r.paraphrases)
        out.extend(_Probe(i, "locality", p.prompt, p.answer) for p in r.locality)
        out.extend(_Probe(i, "portability", p.prompt, p.answer) for p in r.portability)
    return out


def _locality_plus_probes(
    requests: Sequence[EditRequest], partners: Mapping[str, str] | None
) -> tuple[list[_Probe], int]:
    """Locality prompts after the edit's own statement and, given ``partners``, after its
    partner's. Returns the probes and how many locality probes had no partner."""
    out: list[_Probe] = []
    no_partner = 0
    for i, r in enumerate(requests):
        other = partners.get(r.request_id) if partners is not None else None
        for loc in r.locality:
            out.append(_Probe(i, "locality_plus", statement(r) + loc.prompt, loc.answer))
            if other is not None:
                out.append(_Probe(i, "locality_plus_other", other + loc.prompt, loc.answer))
            elif partners is not None:
                no_partner += 1
    return out, no_partner


def _same_subject_probes(requests: Sequence[EditRequest], continuation: Mapping[str, str]) -> tuple[list[_Probe], int]:
    """Same-subject prompts answered by the unedited continuation; an empty one is skipped."""
    out: list[_Probe] = []
    empty = 0
    for i, r in enumerate(requests):
        for prompt in r.same_subject:
            if prompt not in continuation:
                raise KeyError(f"no unedited reference for same_subject probe {prompt!r}")
            answer = continuation[prompt].strip()
            if answer:
                out.append(_Probe(i, "same_subject", prompt, answer))
            else:
                empty += 1
    return out, empty


def _chat_probes(requests: Sequence[EditRequest], template: Callable[[str], tuple[int, ...]]) -> list[_Probe]:
    out: list[_Probe] = []
    for i, r in enumerate(requests):
        out.append(_Probe(i, "chat_reliability", r.prompt, r.target_new, template(r.prompt)))
        out.extend(_Probe(i, "chat_generality", p, r.target_new, template(p)) for p in r.paraphrases)
    return out


def _fluency_probes(requests: Sequence[EditRequest]) -> list[_Probe]:
    return [_Probe(i, "fluency", r.subject, "") for i, r in enumerate(requests) if r.subject]


# -- the evaluator ---------------------------------------------------------------------------------


class Evaluator:
    """Scores a model on requests. Stateless apart from its settings; the reference is explicit."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        *,
        batch_size: int = 64,
        exact_match: bool = True,
        perplexity: bool = False,
        extra_new_tokens: int = 3,
        probes: Collection[str] = ALL_PROBES,
        chat_max_new_tokens: int = 32,
    ) -> None:
        unknown = sorted(set(probes) - set(ALL_PROBES))
        if unknown:
            raise ValueError(f"unknown probe kind(s) {unknown}; choose from {list(ALL_PROBES)}")
        self.probes = frozenset(probes)
        if "chat" in self.probes and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the chat probe needs a tokenizer with a chat template and this one has none; {CHAT_OPTION}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.exact_match = exact_match
        self.perplexity = perplexity
        self.extra_new_tokens = extra_new_tokens
        self.chat_max_new_tokens = chat_max_new_tokens
        self._stop_ids: torch.Tensor | None = None
        self._chat_stops: torch.Tensor | None = None
        self._control_ids: list[int] | None = None
        self._said: set[str] = set()

    # -- helpers -----------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _newline_ids(self) -> torch.Tensor:
        if self._stop_ids is None:
            self._stop_ids = scorers.newline_token_ids(self.tokenizer).to(self._device())
        return self._stop_ids

    def _chat_stop_ids(self) -> torch.Tensor:
        """A chat reply ends at EOS, a newline, or any special token (the end-of-turn marker)."""
        if self._chat_stops is None:
            special = [int(i) for i in getattr(self.tokenizer, "all_special_ids", [])]
            extra = torch.tensor(special, dtype=torch.long, device=self._device())
            self._chat_stops = torch.unique(torch.cat([self._newline_ids().long(), extra]))
        return self._chat_stops

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning(message)

    def _generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        limits: Sequence[int],
        context: ForwardContext,
        stop_ids: torch.Tensor | None,
    ) -> list[str]:
        new_ids = scorers.greedy_generate(
            self.model,
            self.tokenizer,
            prompts,
            limits,
            batch_size=self.batch_size,
            context=context,
            stop_ids=stop_ids,
        )
        return self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def _prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]  # type: ignore[operator]

    def _encode(self, probes: Sequence[_Probe]) -> list[Encoded]:
        return encode_pairs(
            self.tokenizer, [p.prompt for p in probes], [p.answer for p in probes], [p.prompt_ids for p in probes]
        )

    def _limit(self, probe: _Probe, pair: Encoded) -> int:
        if probe.metric == "same_subject":
            return SAME_SUBJECT_NEW_TOKENS
        return len(pair.answer_ids) + self.extra_new_tokens

    def _note_absent(self, requests: Sequence[EditRequest], reference: Reference | None) -> None:
        """Say once per evaluator which probe kinds are absent because no request has their fields."""
        if "locality_plus" in self.probes and not any(r.locality for r in requests):
            self._say_once("no request has locality probes: locality_plus and locality_plus_other probes are absent")
        if "same_subject" in self.probes and not any(r.same_subject for r in requests):
            self._say_once(
                "no request has same_subject prompts (the dataset loaders derive them from a subject): "
                "the same_subject probe is absent"
            )
        if "fluency" in self.probes and not any(r.subject for r in requests):
            self._say_once("no request has a subject: the fluency.ngram_entropy probe is absent (control.ppl is kept)")
        if reference is None and self.probes & {"locality_plus", "same_subject"}:
            self._say_once(
                "evaluated without a Reference: agreement scores, locality_plus_other and same_subject are absent"
            )

    # -- reference ---------------------------------------------------------------------------------

    def reference(self, requests: Sequence[EditRequest], context: ForwardContext = no_context) -> Reference:
        """Cache the unedited model's answers on every probe scored against it (call before any
        edit). ``requests`` is the whole ordered edit stream: it fixes the locality_plus partners."""
        ref = Reference()
        if "locality_plus" in self.probes:
            ref.partners = partner_statements(requests)
        loc_keys = sorted({(p.prompt, p.answer) for r in requests for p in r.locality})
        subject_prompts = sorted({p for r in requests for p in r.same_subject}) if "same_subject" in self.probes else []

        # One generation pass: the locality continuations (for exact match) and the same-subject
        # answers (always: they are the answers of the teacher-forced same_subject probes).
        gen_keys = loc_keys if self.exact_match else []
        gen_pairs = encode_pairs(self.tokenizer, [k[0] for k in gen_keys], [k[1] for k in gen_keys])
        prompts = [p.prompt_ids for p in gen_pairs] + self._prompt_ids(subject_prompts)
        limits = [len(p.answer_ids) + self.extra_new_tokens for p in gen_pairs]
        limits += [SAME_SUBJECT_NEW_TOKENS] * len(subject_prompts)
        if prompts:
            gens = [scorers.natural_stop(g) for g in self._generate_ids(prompts, limits, context, self._newline_ids())]
            ref.generation = dict(zip(gen_keys, gens[: len(gen_keys)], strict=True))
            ref.continuation = dict(zip(subject_prompts, gens[len(gen_keys) :], strict=True))

        # One teacher-forced pass over everything scored by agreement.
        keys = set(loc_keys)
        if "locality_plus" in self.probes:
            plus, _ = _locality_plus_probes(requests, ref.partners)
            keys.update((p.prompt, p.answer) for p in plus)
        if "same_subject" in self.probes:
            same, _ = _same_subject_probes(requests, ref.continuation)
            keys.update((p.prompt, p.answer) for p in same)
        ordered = sorted(keys)
        if ordered:
            pairs = encode_pairs(self.tokenizer, [k[0] for k in ordered], [k[1] for k in ordered])
            argmax, _ = scorers.teacher_forced_predictions(
                self.model, self.tokenizer, pairs, batch_size=self.batch_size, context=context
            )
            ref.argmax = dict(zip(ordered, argmax, strict=True))
        return ref

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(
        self,
        requests: Sequence[EditRequest],
        reference: Reference | None = None,
        context: ForwardContext = no_context,
    ) -> EvalResult:
        """Score ``requests`` under ``context``: build every probe kind's probes, then one
        teacher-forced pass, one generation pass per generation kind and one control-text pass."""
        self._note_absent(requests, reference)
        skipped: dict[str, int] = {}
        forced = _base_probes(requests)
        if "locality_plus" in self.probes:
            plus, skipped["locality_plus_other"] = _locality_plus_probes(
                requests, reference.partners if reference is not None else None
            )
            forced += plus
        if "same_subject" in self.probes and reference is not None:
            same, skipped["same_subject"] = _same_subject_probes(requests, reference.continuation)
            forced += same
        chat = _chat_probes(requests, lambda p: chat_prompt_ids(self.tokenizer, p)) if "chat" in self.probes else []
        fluency = _fluency_probes(requests) if "fluency" in self.probes else []

        probes = forced + chat + fluency
        values = [_Scored() for _ in probes]
        outputs: list[dict[str, list[str]]] = [defaultdict(list) for _ in requests]
        n_forced, n_chat = len(forced), len(chat)
        self._score_forced(forced, values[:n_forced], reference, context)
        self._score_chat(chat, values[n_forced : n_forced + n_chat], outputs, context)
        self._score_fluency(fluency, values[n_forced + n_chat :], outputs, context)
        globals_ = {"control.ppl": self.control_perplexity(context)} if "fluency" in self.probes else {}

        result = self._aggregate(len(requests), probes, values)
        result.outputs = [dict(o) for o in outputs]
        result.globals = globals_
        result.aggregate.update(globals_)
        result.skipped = skipped
        by_request = sorted(range(len(probes)), key=lambda j: probes[j].request)  # stable: probe order kept
        result.samples = [values[j].sample(requests[probes[j].request].request_id, probes[j]) for j in by_request]
        return result

    def _score_forced(
        self,
        probes: Sequence[_Probe],
        values: Sequence[_Scored],
        reference: Reference | None,
        context: ForwardContext,
    ) -> None:
        """One teacher-forced pass over every teacher-forced probe, then (with exact_match) one
        generation pass over those scored by their continuation."""
        if not probes:
            return
        pairs = self._encode(probes)
        argmax, logprob = scorers.teacher_forced_predictions(
            self.model, self.tokenizer, pairs, batch_size=self.batch_size, context=context
        )
        for p, s, pair, a, lp in zip(probes, values, pairs, argmax, logprob, strict=True):
            v = s.scores
            if p.metric not in _NO_TOKEN_ACC:
                v["token_acc"] = scorers.token_accuracy([a], [pair])[0]
            if self.perplexity and p.metric in _BASE:
                v["ppl"] = scorers.perplexity([lp])[0]
            if reference is not None and p.metric in _AGREEMENT:
                ref = reference.argmax.get((p.prompt, p.answer))
                if ref is None:
                    raise KeyError(f"no unedited reference for {p.metric} probe {p.prompt!r}")
                v["agreement"] = scorers.agreement([a], [ref])[0]
        if not self.exact_match:
            return
        rows = [j for j, p in enumerate(probes) if p.metric in _GENERATED]
        gens = self._generate_ids(
            [pairs[j].prompt_ids for j in rows],
            [self._limit(probes[j], pairs[j]) for j in rows],
            context,
            self._newline_ids(),
        )
        for j, g in zip(rows, gens, strict=True):
            p, s = probes[j], values[j]
            s.generated = g
            if p.metric == "locality":
                if reference is not None and (p.prompt, p.answer) in reference.generation:
                    s.reference = reference.generation[(p.prompt, p.answer)]
                    s.scores["generation_agreement"] = float(scorers.natural_stop(g) == s.reference)
            elif p.metric == "same_subject":
                assert reference is not None  # same_subject probes exist only with a reference
                s.reference = reference.continuation[p.prompt]
                s.scores["generation_agreement"] = float(scorers.natural_stop(g) == s.reference)
            else:
                s.scores["exact_match"] = scorers.exact_match([g], [p.answer])[0]

    def _score_chat(
        self,
        probes: Sequence[_Probe],
        values: Sequence[_Scored],
        outputs: Sequence[dict[str, list[str]]],
        context: ForwardContext,
    ) -> None:
        """Free greedy replies to the chat-templated prompts: no length from the target."""
        if not probes:
            return
        prompts = [p.prompt_ids or () for p in probes]
        texts = self._generate_ids(prompts, [self.chat_max_new_tokens] * len(prompts), context, self._chat_stop_ids())
        for p, s, text in zip(probes, values, texts, strict=True):
            s.generated = text
            s.scores["contains"] = scorers.contains([text], [p.answer])[0]
            s.scores["exact_match"] = scorers.exact_match([text.strip()], [p.answer])[0]
            outputs[p.request][p.metric].append(text)

    def _score_fluency(
        self,
        probes: Sequence[_Probe],
        values: Sequence[_Scored],
        outputs: Sequence[dict[str, list[str]]],
        context: ForwardContext,
    ) -> None:
        """Free greedy text from the subject alone, stopped only by EOS: its n-gram entropy."""
        if not probes:
            return
        prompts = self._prompt_ids([p.prompt for p in probes])
        texts = self._generate_ids(prompts, [FLUENCY_NEW_TOKENS] * len(prompts), context, None)
        for p, s, text in zip(probes, values, texts, strict=True):
            s.generated = text
            s.scores["ngram_entropy"] = scorers.ngram_entropy(text)
            outputs[p.request][p.metric].append(text)

    def control_perplexity(self, context: ForwardContext = no_context) -> float:
        """Perplexity of the packaged control text under the (edited) model: one forward pass."""
        if self._control_ids is None:
            self._control_ids = list(self.tokenizer(control_text(), add_special_tokens=True)["input_ids"])  # type: ignore[operator]
        return scorers.sequence_perplexity(
            self.model,
            self.tokenizer,
            self._control_ids,
            context=context,
            max_length=scorers.context_length(self.model),
        )

    @staticmethod
    def _aggregate(n: int, probes: Sequence[_Probe], values: Sequence[_Scored]) -> EvalResult:
        # First average a request's probes of one metric, then average requests, so a request with
        # three paraphrases weighs as much as one with a single paraphrase.
        sums: list[dict[str, list[float]]] = [defaultdict(list) for _ in range(n)]
        for p, v in zip(probes, values, strict=True):
            for scorer, x in v.scores.items():
                sums[p.request][f"{p.metric}.{scorer}"].append(x)
        per_request = [{k: sum(xs) / len(xs) for k, xs in s.items()} for s in sums]
        totals: dict[str, list[float]] = defaultdict(list)
        for r in per_request:
            for k, x in r.items():
                totals[k].append(x)
        aggregate = {k: sum(xs) / len(xs) for k, xs in sorted(totals.items())}
        return EvalResult(per_request=per_request, aggregate=aggregate, n_requests=n)
