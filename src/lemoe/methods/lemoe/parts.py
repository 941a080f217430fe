"""Training rows split into parts that run as one forward each, sharing a frozen token prefix.

Every chat wording of a batch starts with the same tokens: the template's system prompt and user
header, about 30 tokens for SmolLM2 against 10-15 for the edit prompt itself. The expert acts at
the subject's tokens, after that prefix, so with causal attention the prefix's keys and values at
every layer never depend on the expert: they are computed once per batch (one sequence) and each
training step runs only the rows' suffixes against that cache. This is what makes training on the
template's default system prompt (how an Instruct model is actually asked) affordable.

A part is a set of rows (indices into the batch) with its columns (all of them, or the suffix after
a shared prefix). :func:`split_shared_prefix` decides the parts from token ids alone, so any
tokenisation is handled: a prefix is shared only when every row of the group starts with the same
tokens and no expert position or target lies inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lemoe.methods.training import LMBatch

MIN_SHARED = 4  # a shorter common prefix is not worth a second forward per step


@dataclass
class Part:
    rows: torch.Tensor  # [n] indices of these rows in the full batch
    batch: LMBatch  # the rows, from column ``start`` on
    mask: torch.Tensor  # [n, t - start] positions the expert acts at
    start: int = 0  # length of the shared prefix (0: none)
    prefix_ids: torch.Tensor | None = None  # [1, start] the prefix's tokens
    prefix_cache: Any = None  # KV cache of the prefix (batch of one), filled by the method
    hidden: torch.Tensor | None = None  # the input of the edited block, filled by the method
    tuple_out: bool = True


def _width(batch: LMBatch, rows: torch.Tensor) -> int:
    """The rows' longest real length (the batch is right-padded to its longest row overall)."""
    return int(batch.attention_mask[rows].sum(1).max())


def _columns(batch: LMBatch, rows: torch.Tensor, start: int, end: int) -> LMBatch:
    return LMBatch(
        batch.input_ids[rows, start:end],
        batch.attention_mask[rows, start:end],
        batch.prompt_mask[rows, start:end],
        batch.target_mask[rows, start:end],
    )


def shared_prefix_length(batch: LMBatch, rows: torch.Tensor, mask: torch.Tensor) -> int:
    """Longest token prefix common to ``rows`` that holds no expert position and no target."""
    ids = batch.input_ids[rows]
    same = (ids == ids[:1]).all(0) & batch.attention_mask[rows].bool().all(0)
    first_diff = int((~same).nonzero()[0]) if bool((~same).any()) else ids.shape[1]
    acting = (mask[rows] | batch.target_mask[rows]).any(0)
    first_act = int(acting.nonzero()[0]) if bool(acting.any()) else ids.shape[1]
    return max(0, min(first_diff, first_act, ids.shape[1] - 1))


def split_shared_prefix(batch: LMBatch, mask: torch.Tensor, group: torch.Tensor) -> list[Part]:
    """One part for every row, or two: the rows outside ``group`` [B] (bool), and the rows in it as
    suffixes after their shared prefix, when that prefix is at least ``MIN_SHARED`` tokens; each
    part cut to its own longest row."""
    everything = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    inside = everything[group.to(everything.device)]
    if inside.numel() >= 2:
        start = shared_prefix_length(batch, inside, mask)
        if start >= MIN_SHARED:
            outside = everything[~group.to(everything.device)]
            parts = []
            if outside.numel():  # cut to their own length: chat rows no longer set their padding
                end = _width(batch, outside)
                parts.append(Part(outside, _columns(batch, outside, 0, end), mask[outside, :end]))
            end = _width(batch, inside)
            prefix = batch.input_ids[inside[:1], :start]
            shared = Part(inside, _columns(batch, inside, start, end), mask[inside, start:end], start, prefix)
            return [*parts, shared]
    return [Part(everything, batch, mask)]
