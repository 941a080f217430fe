"""Batched, padding-correct scorers. Each returns one number per (prompt, answer) pair.

Scorer names (every result carries one):

- ``token_acc``   teacher-forced token accuracy: feed ``prompt + " " + answer``, take the argmax at
                  each answer position; score = fraction of answer tokens predicted right.
- ``agreement``   the same teacher-forced pass, scored as the fraction of answer positions whose
                  argmax equals the unedited model's (relative locality; needs a reference).
- ``exact_match`` greedy decoding from the prompt with a natural stop (EOS, newline, sentence end),
                  normalised string equality with the answer.
- ``ppl``         perplexity of the answer given the prompt (``control.ppl``: of a whole fixed text).
- ``contains``    free greedy generation; the normalised answer occurs in the normalised generation
                  at word boundaries.
- ``ngram_entropy`` ROME's fluency measure of a free generation (see :func:`ngram_entropy`).

All passes right-pad (positions stay natural for teacher forcing) and sort by length so a batch
holds sequences of similar size. Generation left-pads with explicit position ids.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from lemoe.batching import pad_id, pad_left, pad_right
from lemoe.models.kv_cache import cache_keyword, returned_cache
from lemoe.models.logits import logits_only_at
from lemoe.tokens import Encoded

# A hook that wraps every forward pass of the evaluator. Methods whose behaviour depends on which
# tokens are the prompt (LEMoE routes on the prompt only) receive the prompt mask through it.
ForwardContext = Callable[[torch.Tensor], AbstractContextManager[object]]


def no_context(_prompt_mask: torch.Tensor) -> AbstractContextManager[object]:
    return nullcontext()


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])


@torch.no_grad()
def teacher_forced_predictions(
    model: torch.nn.Module,
    tokenizer: object,
    pairs: Sequence[Encoded],
    *,
    batch_size: int = 64,
    context: ForwardContext = no_context,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each pair, the argmax token and the log-probability of the true token at each answer
    position (both 1-D tensors of the answer's length)."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer, eos_fallback=False)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].answer_ids))
    argmax: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    logprob: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for idx in _batches(order, batch_size):
        ids, mask = pad_right([pairs[i].prompt_ids + pairs[i].answer_ids for i in idx], pad)
        prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
        for r, i in enumerate(idx):
            prompt_mask[r, : len(pairs[i].prompt_ids)] = True
        n_ans = max(len(pairs[i].answer_ids) for i in idx)
        # logits at position t predict token t+1: answer token j is predicted at n_p - 1 + j
        positions = torch.zeros((len(idx), n_ans), dtype=torch.long)
        targets = torch.zeros((len(idx), n_ans), dtype=torch.long)
        for r, i in enumerate(idx):
            n_p, n_a = len(pairs[i].prompt_ids), len(pairs[i].answer_ids)
            positions[r, :n_a] = torch.arange(n_p - 1, n_p - 1 + n_a)
            targets[r, :n_a] = torch.tensor(pairs[i].answer_ids)
        ids, mask, prompt_mask = ids.to(device), mask.to(device), prompt_mask.to(device)
        positions, targets = positions.to(device), targets.to(device)
        with context(prompt_mask), logits_only_at(model, positions):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        best = logits.argmax(-1)
        for r, i in enumerate(idx):
            n_a = len(pairs[i].answer_ids)
            argmax[i] = best[r, :n_a].cpu()
            logprob[i] = logp[r, :n_a].cpu()
    return argmax, logprob


def token_accuracy(argmax: Sequence[torch.Tensor], pairs: Sequence[Encoded]) -> list[float]:
    return [
        float((a == torch.tensor(p.answer_ids)).float().mean()) if p.answer_ids else 0.0
        for a, p in zip(argmax, pairs, strict=True)
    ]


def agreement(argmax: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[float]:
    return [float((a == r).float().mean()) for a, r in zip(argmax, reference, strict=True)]


def perplexity(logprob: Sequence[torch.Tensor]) -> list[float]:
    return [float(torch.exp(-lp.mean())) for lp in logprob]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


_STOP = re.compile(r"\n|\.(\s|$)|<\|")
_STOP_CHARS = ".,;:!?\n"


def natural_stop(text: str) -> str:
    """Cut a continuation at the first newline, sentence end or special-token marker."""
    m = _STOP.search(text)
    return text[: m.start()] if m else text


def matches_with_natural_stop(generation: str, answer: str) -> bool:
    """The continuation spells the answer (normalised) and then stops: it ends there, or the next
    character is punctuation or a newline. Comparing the answer-length head first keeps answers
    with inner periods ("U.S. Army") matchable."""
    g, a = generation.lstrip(), answer.strip()
    head, rest = g[: len(a)], g[len(a) :]
    return normalise_answer(head) == normalise_answer(a) and (rest == "" or rest[0] in _STOP_CHARS)


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    *,
    batch_size: int = 64,
    context: ForwardContext = no_context,
    stop_ids: torch.Tensor | None = None,
    on_step: Callable[[list[int], list[int]], Sequence[bool]] | None = None,
) -> list[list[int]]:
    """Greedy continuations, left-padded and batched, with a KV cache; a row stops at EOS, at any
    of ``stop_ids`` (kept in the output) or at its own ``max_new_tokens``. Returns new token ids.

    ``on_step(rows, tokens)``, if given, sees every step's new token of each row of the current
    batch (``rows`` are indices into ``prompts``, including rows already done) and answers, per row,
    whether that row should stop now: how a server streams text and applies its own stop rules."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer, eos_fallback=False)
    eos = getattr(tokenizer, "eos_token_id", None)
    cache_kw = cache_keyword(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for idx in _batches(order, batch_size):
        ids, mask = pad_left([prompts[i] for i in idx], pad, device)
        limit = torch.tensor([max_new_tokens[i] for i in idx], device=device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        generated = torch.zeros((len(idx), int(limit.max())), dtype=torch.long, device=device)
        past = None
        step_ids, step_mask = ids, mask
        with context(mask.bool()), logits_only_at(model, None):
            for t in range(int(limit.max())):
                positions = (step_mask.cumsum(-1) - 1).clamp(min=0)
                positions = positions[:, -step_ids.shape[1] :]
                res = model(
                    input_ids=step_ids,
                    attention_mask=step_mask,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_kw: past},
                )
                past = returned_cache(res)
                nxt = res.logits[:, -1].argmax(-1)
                generated[:, t] = nxt
                done |= (t + 1) >= limit
                if eos is not None:
                    done |= nxt == eos
                if stop_ids is not None:
                    done |= torch.isin(nxt, stop_ids)
                if on_step is not None:
                    stop_now = on_step(idx, nxt.tolist())
                    done |= torch.tensor(list(stop_now), dtype=torch.bool, device=device)
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
        for r, i in enumerate(idx):
            row = generated[r, : int(limit[r])].tolist()
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            if stop_ids is not None:
                stops = set(stop_ids.tolist())
                cut = next((j for j, tok in enumerate(row) if tok in stops), None)
                row = row if cut is None else row[: cut + 1]
            out[i] = row
    return out


def exact_match(generations: Sequence[str], answers: Sequence[str]) -> list[float]:
    return [float(matches_with_natural_stop(g, a)) for g, a in zip(generations, answers, strict=True)]


def contains_answer(generation: str, answer: str) -> bool:
    """The normalised answer occurs in the normalised generation as whole words. A chat reply
    ("Sure! The capital is Rome.") is judged on whether it says the answer, not on its first words.
    An answer that normalises to nothing (only articles/punctuation) is never contained."""
    a, g = normalise_answer(answer), normalise_answer(generation)
    return bool(a) and f" {a} " in f" {g} "


def contains(generations: Sequence[str], answers: Sequence[str]) -> list[float]:
    return [float(contains_answer(g, a)) for g, a in zip(generations, answers, strict=True)]


NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


def ngram_entropy(text: str) -> float:
    """ROME's fluency measure (Meng et al. 2022, ``compute_n_gram_entropy``) without nltk.

    Words are the whitespace-separated pieces of ``text``. For n = 2 and 3, H_n is the entropy in
    bits of the frequency distribution of the text's word n-grams, ``-sum f log2 f``. The score is
    the weighted mean ``(2/3 * H_2 + 4/3 * H_3) / 2``. Repetitive text (the failure mode of an
    over-edited model) scores near 0; k distinct words score ``(2/3 log2(k-1) + 4/3 log2(k-2)) / 2``.
    A text too short to hold an n-gram contributes H_n = 0.
    """
    words = text.split()
    weighted = []
    for n, w in zip(NGRAM_ORDERS, NGRAM_WEIGHTS, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(w * h)
    return sum(weighted) / len(weighted)


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


@torch.no_grad()
def sequence_perplexity(
    model: torch.nn.Module,
    tokenizer: object,
    ids: Sequence[int],
    *,
    context: ForwardContext = no_context,
    max_length: int | None = None,
) -> float:
    """Perplexity of a whole token sequence: exp of the mean NLL of every token after the first.

    A sequence longer than ``max_length`` is cut into consecutive windows of that length, each
    scored on its own (its first token unpredicted); all windows go through one batched forward
    pass. Every real token is marked as prompt for ``context``."""
    device = next(model.parameters()).device
    size = max_length or len(ids)
    windows = [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("sequence_perplexity needs at least two tokens")
    batch, mask = pad_right(windows, pad_id(tokenizer, eos_fallback=False))
    batch, mask = batch.to(device), mask.to(device)
    with context(mask.bool()):
        logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = mask[:, 1:].bool()
    return float(torch.exp(-logp[scored].mean()))


def newline_token_ids(tokenizer: object) -> torch.Tensor:
    """Ids of vocabulary tokens whose text contains a newline: a natural stop for generation."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    ids = sorted(vocab.values())
    texts = tokenizer.convert_ids_to_tokens(ids)  # type: ignore[attr-defined]
    # Byte-level BPE spells a newline as "Ċ"; SentencePiece as "<0x0A>" or a literal "\n".
    return torch.tensor([i for i, t in zip(ids, texts, strict=True) if t and ("\n" in t or "Ċ" in t or t == "<0x0A>")])
