"""Shared pieces for methods that optimise on edit targets: batches and the masked NLL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lemoe.batching import pad_id, pad_right
from lemoe.tokens import encode_pairs


@dataclass
class LMBatch:
    """Right-padded ``prompt + " " + target`` sequences with per-token masks."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor  # True on prompt tokens
    target_mask: torch.Tensor  # True on target tokens

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_mask, self.target_mask))
        )


def build_lm_batch(tokenizer: object, prompts: Sequence[str], targets: Sequence[str]) -> LMBatch:
    pairs = encode_pairs(tokenizer, prompts, targets)
    # Same pad rule as the evaluator (pad token, else 0), so training and scoring inputs match.
    ids, attn = pad_right([p.prompt_ids + p.answer_ids for p in pairs], pad_id(tokenizer, eos_fallback=False))
    pmask = torch.zeros_like(ids, dtype=torch.bool)
    tmask = torch.zeros_like(ids, dtype=torch.bool)
    for r, p in enumerate(pairs):
        n_p, n_a = len(p.prompt_ids), len(p.answer_ids)
        pmask[r, :n_p] = True
        tmask[r, n_p : n_p + n_a] = True
    return LMBatch(ids, attn, pmask, tmask)


def token_nll(logits: torch.Tensor, batch: LMBatch, *, targets_only: bool = True) -> torch.Tensor:
    """Per-sequence mean NLL over target tokens (or over every real token after the first)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch.input_ids[:, 1:]
    mask = (batch.target_mask if targets_only else batch.attention_mask.bool())[:, 1:]
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def target_token_accuracy(logits: torch.Tensor, batch: LMBatch) -> torch.Tensor:
    """Per-sequence teacher-forced accuracy on target tokens (to stop training early)."""
    pred = logits[:, :-1].argmax(-1)
    labels = batch.input_ids[:, 1:]
    mask = batch.target_mask[:, 1:]
    return ((pred == labels) & mask).sum(-1).float() / mask.sum(-1).clamp(min=1)
