"""Which tokens ask which question: clause segments for span-level expert gating.

A subject key says *that* an edited subject occurs in a text, not that the text asks about it. In
"Acme's CEO is Jane Doe. The capital of France is", one decision per sequence would send the whole
sequence, and so the answer to the second question, through Acme's expert. Segment gating cuts the
prompt into clauses at sentence ends (".", "?", "!" before a space or the end, and newlines) and at
special tokens, routes every clause on the subjects matched inside it, and lets each position use
the expert of the clause that asks the question being answered: the prompt's last clause, together
with the clauses before it that have too little content to be a question of their own (a chat
template's "<|im_start|>assistant\\n" after the user's question, "Answer:"). A last clause with
content but no edited subject gets no expert, and neither does any earlier clause: an edited
statement earlier in the text then changes no hidden state a later question reads. Two edited facts
in one text are each answered by their own expert when each is the question asked. Tokens after
the prompt (the answer during teacher forcing, generated tokens) continue the prompt's last clause.

Everything here is a pure function of token ids and per-token tables built once per tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lemoe.methods.lemoe.router import NULL

_ENDERS = (".", "?", "!")


@dataclass(frozen=True)
class TokenClasses:
    """Per-vocabulary-id flags (``[V]`` bool tensors)."""

    ender: torch.Tensor  # token text ends with ., ? or ! (a clause end if a space or the end follows)
    newline: torch.Tensor  # token text holds a newline (always a clause end)
    special: torch.Tensor  # a special token (chat markers, BOS/EOS): a clause end, never content
    blank: torch.Tensor  # only whitespace: never content
    space_led: torch.Tensor  # token text starts with whitespace
    letter: torch.Tensor  # a single capital letter ("U" in "U.S."): a period after it ends no clause

    def to(self, device: torch.device) -> TokenClasses:
        return TokenClasses(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def token_classes(tokenizer: object, vocab_size: int) -> TokenClasses:
    """Classify every token id of ``tokenizer`` (ids past its vocabulary count as blank)."""
    n = max(vocab_size, len(tokenizer))  # type: ignore[arg-type]
    rows = [[i] for i in range(n)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: one Rust call (~0.2 s)
    if backend is not None:
        texts = backend.decode_batch(rows, skip_special_tokens=False)
    else:
        texts = tokenizer.batch_decode(rows, skip_special_tokens=False)  # type: ignore[attr-defined]
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    stripped = [t.strip() for t in texts]

    def flag(values: list[bool]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.bool)

    return TokenClasses(
        ender=flag([t.rstrip(" ").endswith(_ENDERS) for t in texts]),
        newline=flag(["\n" in t for t in texts]),
        special=flag([i in special_ids for i in range(n)]),
        blank=flag([not t for t in stripped]),
        space_led=flag([t[:1].isspace() for t in texts]),
        letter=flag([len(t) == 1 and t.isupper() for t in stripped]),  # an initial: "U" of "U.S."
    )


def clause_segments(ids: torch.Tensor, valid: torch.Tensor, classes: TokenClasses) -> tuple[torch.Tensor, torch.Tensor]:
    """Clause index of every position (``[B, T]``, from 0) and which positions are content.

    Only ``valid`` positions (the prompt) end clauses or count as content; a clause-ending token
    belongs to the clause it ends. A role header (the token between a special token and a newline,
    like "assistant" in a chat template) is not content.
    """
    ids = ids.clamp(0, classes.ender.numel() - 1)
    special, newline, blank = classes.special[ids], classes.newline[ids], classes.blank[ids]
    nxt = torch.roll(ids, -1, dims=1)
    prev = torch.roll(ids, 1, dims=1)
    last = torch.zeros_like(valid)
    last[:, -1] = True
    nxt_valid = torch.roll(valid, -1, dims=1) & ~last
    follows = ~nxt_valid | classes.space_led[nxt] | classes.newline[nxt] | classes.special[nxt]
    after_letter = classes.letter[prev] & ~classes.space_led[ids]
    first = torch.zeros_like(valid)
    first[:, 0] = True
    after_letter &= ~first
    ends = valid & (special | newline | (classes.ender[ids] & follows & ~after_letter))
    header = (classes.special[prev] & ~first) & (classes.newline[nxt] & nxt_valid) & ~special
    content = valid & ~special & ~blank & ~header
    segment = ends.long().cumsum(1) - ends.long()
    return segment, content


def gate_by_clause(
    clause_choice: torch.Tensor, clause_content: torch.Tensor, last_clause: torch.Tensor, min_content: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert of every clause (``[B, S]``): only the final *run* of clauses, which asks the
    question being answered, gets one.

    A run starts at a clause with its own matched subject or with at least ``min_content`` content
    tokens (a question of its own); clauses without either (a chat template's assistant header,
    "Answer:") continue the run before them. The final run is the one holding ``last_clause``
    (``[B]``); it gets the expert of the subject matched in its first clause, or none. Earlier runs
    get none: an edited statement earlier in a text does not reach the hidden states that a later
    question reads through attention. Also returns the final run's opening clause (``[B]``, -1
    where the final run has no expert).
    """
    starts = (clause_choice != NULL) | (clause_content >= min_content)
    run = starts.long().cumsum(1)
    final = run.gather(1, last_clause[:, None])
    first = (starts & (run == final)).long().argmax(1)  # the final run's opening clause
    expert = clause_choice.gather(1, first[:, None])
    expert = torch.where(run.gather(1, first[:, None]) == final, expert, torch.full_like(expert, NULL))
    gate = torch.where(run == final, expert.expand_as(clause_choice), torch.full_like(clause_choice, NULL))
    opening = torch.where(expert.squeeze(1) != NULL, first, torch.full_like(first, -1))
    return gate, opening


def clause_scores(scores: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Best window score per clause: ``[B, T, K]`` (window ending at each position) -> ``[B, S, K]``."""
    b, _, k = scores.shape
    out = torch.full((b, n_segments, k), float("-inf"), device=scores.device, dtype=scores.dtype)
    index = segment.unsqueeze(-1).expand(-1, -1, k)
    return out.scatter_reduce(1, index, scores, reduce="amax", include_self=True)


def clause_content_counts(segment: torch.Tensor, content: torch.Tensor, n_segments: int) -> torch.Tensor:
    out = torch.zeros(segment.shape[0], n_segments, dtype=torch.long, device=segment.device)
    return out.scatter_add(1, segment, content.long())


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid position (0 for a row with none)."""
    t = valid.shape[1]
    pos = torch.arange(t, device=valid.device).expand_as(valid)
    return torch.where(valid, pos, torch.zeros_like(pos)).max(1).values
