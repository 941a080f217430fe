"""Tokenisation shared by the methods and the evaluator: prompt/answer pairs with exact answer
positions, and a prompt asked through the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Encoded:
    """A prompt and answer as token ids (answer ids follow the prompt ids directly)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def encode_pairs(
    tokenizer: object,
    prompts: Sequence[str],
    answers: Sequence[str],
    prompt_ids: Sequence[Sequence[int] | None] | None = None,
) -> list[Encoded]:
    """Tokenise prompt and ``" " + answer`` separately so answer positions are exact.

    A row whose ``prompt_ids`` entry is given keeps those ids as its prompt (already tokenised,
    e.g. through a chat template, special tokens included) instead of tokenising ``prompts[i]``."""
    given = list(prompt_ids) if prompt_ids is not None else [None] * len(prompts)
    todo = [i for i, g in enumerate(given) if g is None]
    p_ids: list[Sequence[int]] = [g if g is not None else () for g in given]
    if todo:
        fresh = tokenizer([prompts[i] for i in todo], add_special_tokens=True)["input_ids"]  # type: ignore[operator]
        for i, ids in zip(todo, fresh, strict=True):
            p_ids[i] = ids
    a_ids: list[Sequence[int]] = []
    if answers:
        a_ids = tokenizer([" " + a.lstrip() for a in answers], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return [Encoded(tuple(p), tuple(a)) for p, a in zip(p_ids, a_ids, strict=True)]


def chat_prompt_ids(tokenizer: object, prompt: str) -> tuple[int, ...]:
    """``prompt`` as one user turn of the tokenizer's chat template, ready for the assistant's reply.
    The template writes its own special tokens, so tokenising adds none (no second BOS)."""
    text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
