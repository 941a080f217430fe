"""Token-id lists to padded ``(input_ids, attention_mask)`` tensors, shared by every batched pass.

Teacher-forced passes (evaluator scorers, training batches, locate/CoachHooK key reads, covariance
statistics) pad on the right: each row's real tokens keep their natural positions 0..n-1, so a
model called without ``position_ids`` sees a padded row exactly as it would see it alone, and
token ``t`` of a row sits at column ``t`` for every read-out. This is the evaluator's convention;
methods use the same one so what they optimise lines up with what is scored.

Generation pads on the left instead (:func:`pad_left`), so every row continues at the last column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_id(tokenizer: object, *, eos_fallback: bool = True) -> int:
    """The id to fill padding with: the pad token, else EOS, else 0.

    ``eos_fallback=False`` skips EOS (pad token, else 0): the evaluator and LM training batches
    have always used that rule, and keep it so their inputs do not change. Padded columns are
    masked either way.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and eos_fallback:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty batch (no sequences)")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[r, cols] = 1
    # Built on the CPU and moved once: one transfer per batch rather than one per row.
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both ``long`` ``[len(seqs), longest]``, on ``device``
    (CPU when None). Raises ``ValueError`` on an empty list."""
    return _pad(seqs, pad_id, device, left=False)


def pad_left(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (for generation: every row ends at the last column).
    Same shapes, dtypes and errors as :func:`pad_right`; callers derive positions from the mask."""
    return _pad(seqs, pad_id, device, left=True)
