"""The evaluator: turns requests into probes, runs the scorers in a few big batches, aggregates.

Metric keys are ``<metric>.<scorer>``:

- ``reliability.token_acc`` / ``reliability.exact_match`` (/ ``reliability.ppl``): the edit prompt;
- ``generality.*``: the paraphrases (mean over a request's paraphrases);
- ``portability.token_acc``: portability probes;
- ``locality.agreement``: teacher-forced argmax unchanged versus the unedited model (WISE/EasyEdit
  "Loc"); ``locality.token_acc``: absolute accuracy on the locality answer ("specificity");
  ``locality.generation_agreement``: greedy continuation unchanged versus the unedited model.

Locality needs a :class:`Reference` taken from the unedited model before the first edit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lemoe.evaluation import scorers
from lemoe.evaluation.scorers import Encoded, ForwardContext, no_context
from lemoe.requests import EditRequest


@dataclass
class Reference:
    """Unedited-model predictions on locality probes, keyed by (prompt, answer)."""

    argmax: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    generation: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass
class EvalResult:
    per_request: list[dict[str, float]]
    aggregate: dict[str, float]
    n_requests: int


@dataclass(frozen=True)
class _Probe:
    request: int
    metric: str
    prompt: str
    answer: str


def _probes(requests: Sequence[EditRequest]) -> list[_Probe]:
    out: list[_Probe] = []
    for i, r in enumerate(requests):
        out.append(_Probe(i, "reliability", r.prompt, r.target_new))
        out.extend(_Probe(i, "generality", p, r.target_new) for p in r.paraphrases)
        out.extend(_Probe(i, "locality", p.prompt, p.answer) for p in r.locality)
        out.extend(_Probe(i, "portability", p.prompt, p.answer) for p in r.portability)
    return out


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.exact_match = exact_match
        self.perplexity = perplexity
        self.extra_new_tokens = extra_new_tokens
        self._stop_ids: torch.Tensor | None = None

    def _newline_ids(self) -> torch.Tensor:
        if self._stop_ids is None:
            self._stop_ids = scorers.newline_token_ids(self.tokenizer).to(next(self.model.parameters()).device)
        return self._stop_ids

    def _generate(self, pairs: Sequence[Encoded], context: ForwardContext) -> list[str]:
        new_ids = scorers.greedy_generate(
            self.model,
            self.tokenizer,
            [p.prompt_ids for p in pairs],
            [len(p.answer_ids) + self.extra_new_tokens for p in pairs],
            batch_size=self.batch_size,
            context=context,
            stop_ids=self._newline_ids(),
        )
        return self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def reference(self, requests: Sequence[EditRequest], context: ForwardContext = no_context) -> Reference:
        """Cache the unedited model's answers on every locality probe (call before any edit)."""
        keys = sorted({(p.prompt, p.answer) for r in requests for p in r.locality})
        ref = Reference()
        if not keys:
            return ref
        pairs = scorers.encode_pairs(self.tokenizer, [k[0] for k in keys], [k[1] for k in keys])
        argmax, _ = scorers.teacher_forced_predictions(
            self.model, self.tokenizer, pairs, batch_size=self.batch_size, context=context
        )
        ref.argmax = dict(zip(keys, argmax, strict=True))
        if self.exact_match:
            gens = self._generate(pairs, context)
            ref.generation = {k: scorers.natural_stop(g) for k, g in zip(keys, gens, strict=True)}
        return ref

    def evaluate(
        self,
        requests: Sequence[EditRequest],
        reference: Reference | None = None,
        context: ForwardContext = no_context,
    ) -> EvalResult:
        probes = _probes(requests)
        pairs = scorers.encode_pairs(self.tokenizer, [p.prompt for p in probes], [p.answer for p in probes])
        argmax, logprob = scorers.teacher_forced_predictions(
            self.model, self.tokenizer, pairs, batch_size=self.batch_size, context=context
        )
        acc = scorers.token_accuracy(argmax, pairs)
        values: list[dict[str, float]] = [{} for _ in probes]
        for v, a in zip(values, acc, strict=True):
            v["token_acc"] = a
        if self.perplexity:
            for v, ppl in zip(values, scorers.perplexity(logprob), strict=True):
                v["ppl"] = ppl
        if self.exact_match:
            gens = self._generate(pairs, context)
            for v, p, g in zip(values, probes, gens, strict=True):
                if p.metric == "locality":
                    if reference is not None and (p.prompt, p.answer) in reference.generation:
                        same = scorers.natural_stop(g) == reference.generation[(p.prompt, p.answer)]
                        v["generation_agreement"] = float(same)
                else:
                    v["exact_match"] = scorers.exact_match([g], [p.answer])[0]
        if reference is not None:
            for v, p, a in zip(values, probes, argmax, strict=True):
                if p.metric == "locality":
                    ref = reference.argmax.get((p.prompt, p.answer))
                    if ref is None:
                        raise KeyError(f"no unedited reference for locality probe {p.prompt!r}")
                    v["agreement"] = scorers.agreement([a], [ref])[0]
        return self._aggregate(len(requests), probes, values)

    @staticmethod
    def _aggregate(n: int, probes: Sequence[_Probe], values: Sequence[dict[str, float]]) -> EvalResult:
        # First average a request's probes of one metric, then average requests, so a request with
        # three paraphrases weighs as much as one with a single paraphrase.
        sums: list[dict[str, list[float]]] = [defaultdict(list) for _ in range(n)]
        for p, v in zip(probes, values, strict=True):
            for scorer, x in v.items():
                sums[p.request][f"{p.metric}.{scorer}"].append(x)
        per_request = [{k: sum(xs) / len(xs) for k, xs in s.items()} for s in sums]
        totals: dict[str, list[float]] = defaultdict(list)
        for r in per_request:
            for k, x in r.items():
                totals[k].append(x)
        aggregate = {k: sum(xs) / len(xs) for k, xs in sorted(totals.items())}
        return EvalResult(per_request=per_request, aggregate=aggregate, n_requests=n)
