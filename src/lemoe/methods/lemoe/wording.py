"""The texts an edit's expert is trained on, and the positions it acts at in each.

An expert trained on one sentence learns that sentence. Each edit is therefore also trained in
other wordings that are *not* evaluation probes: the prompt as a chat user message (how an
Instruct model is asked), the prompt behind unrelated generic sentences, and, as preservation rows,
other relations of the same subject ("X died in the city of" for an edit of X's employer) on which
the expert must leave the base model's prediction unchanged. The preservation templates below are
this method's own training set; the evaluator's ``same_subject`` probes use a separate fixed set
(``lemoe.data.probes``), so the method is never tuned on the probes it is scored with.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lemoe.requests import EditRequest

# (relation, template, words that mark an edit prompt as being about this relation)
PRESERVE_TEMPLATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("death place", "{} died in the city of", ("died", "death")),
    ("nationality", "The nationality of {} is", ("nationality", "citizen", "country")),
    ("religion", "{} follows the religion of", ("religion", "religious", "faith")),
    ("known as", "{} is best known as a", ("known", "famous", "profession", "occupation", "job")),
    ("language", "{} speaks the language", ("language", "tongue", "speak", "speaks")),
    ("continent", "{} is on the continent of", ("continent", "located", "location")),
    ("membership", "{} is a member of the", ("member", "team", "club", "plays", "position")),
    ("maker", "{} was made by the company", ("made", "produced", "manufactured", "developed", "owned", "owner")),
    ("founding", "{} was founded in the year", ("founded", "established", "created", "formed")),
    ("capital", "The capital city of {} is", ("capital",)),
)

Positions = Literal["run", "subject"]


@dataclass(frozen=True)
class TrainingRow:
    """One training text: the target (empty for a preservation row), where the edit prompt starts
    and where its subject is (character offsets in ``text``)."""

    text: str
    target: str
    prompt_start: int
    subject: tuple[int, int] | None

    @property
    def preserve(self) -> bool:
        return not self.target


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def preservation_prompts(request: EditRequest, k: int) -> list[str]:
    """Up to ``k`` other-relation prompts about the request's subject: templates whose relation
    words occur in neither the prompt nor the target are kept, in their fixed order."""
    if not request.subject or k <= 0:
        return []
    seen = _words(request.prompt) | _words(request.target_new)
    keep = [t for _, t, marks in PRESERVE_TEMPLATES if not (seen & set(marks))]
    return [t.format(request.subject) for t in keep[:k]]


def _row(before: str, request: EditRequest, after: str, target: str) -> TrainingRow:
    subject = None
    if request.subject and request.subject in request.prompt:
        start = len(before) + request.prompt.index(request.subject)
        subject = (start, start + len(request.subject))
    return TrainingRow(before + request.prompt + after, target, len(before), subject)


def training_rows(
    requests: Sequence[EditRequest],
    target_suffix: str,
    chat_wrap: tuple[str, str] | None,
    prefixes: Sequence[Callable[[int], str]],
    preserve: int,
) -> list[TrainingRow]:
    """Every row of one batch: the bare prompts, then each wording, then preservation rows.

    ``prefixes`` are functions of the request's index giving an unrelated sentence to put first."""
    rows = [_row("", r, "", r.target_new + target_suffix) for r in requests]
    if chat_wrap is not None:
        rows += [_row(chat_wrap[0], r, chat_wrap[1], r.target_new + target_suffix) for r in requests]
    for prefix in prefixes:
        rows += [_row(prefix(i) + " ", r, "", r.target_new + target_suffix) for i, r in enumerate(requests)]
    for r in requests:
        for text in preservation_prompts(r, preserve):  # only requests with a subject have any
            start = text.index(r.subject or "")
            rows.append(TrainingRow(text, "", 0, (start, start + len(r.subject or ""))))
    return rows


def expert_mask(tokenizer: object, rows: Sequence[TrainingRow], width: int, positions: Positions) -> torch.Tensor:
    """``[len(rows), width]`` positions the trained expert acts at, as gating acts at inference.

    ``run``: from the edit prompt's first token to the end (a context before the prompt is an
    earlier clause, which gets no expert); the whole row when the prompt starts the text.
    ``subject``: only the subject's tokens (the whole prompt when a row has no subject)."""
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    enc = tokenizer(  # type: ignore[operator]
        [r.text for r in rows], add_special_tokens=True, return_offsets_mapping=True
    )
    for i, (row, offsets) in enumerate(zip(rows, enc["offset_mapping"], strict=True)):
        real = [(j, a, b) for j, (a, b) in enumerate(offsets) if b > a]
        if positions == "subject" and row.subject is not None:
            s, e = row.subject
            for j, a, b in real:
                if b > s and a < e:
                    mask[i, j] = True
        elif row.prompt_start == 0:
            mask[i] = True
        else:
            first = next((j for j, a, _ in real if a >= row.prompt_start), len(offsets))
            mask[i, first:] = True
    return mask


def chat_wrap(tokenizer: object, system: str | None = None) -> tuple[str, str] | None:
    """(text before, text after) a user message in the tokenizer's chat template, or None when it
    has none. ``system``: a system message to put first (None: the template's own default)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00MSG\x00"
    messages = [{"role": "user", "content": marker}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that rejects this conversation: no chat wording
        return None
    if not isinstance(text, str) or text.count(marker) != 1:
        return None
    head, tail = text.split(marker)
    bos = getattr(tokenizer, "bos_token", None)
    return (head[len(bos) :] if bos and head.startswith(bos) else head, tail)
