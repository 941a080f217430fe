"""Computing the output head only where logits are read (the evaluator's and methods' main saving)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def logits_only_at(model: torch.nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Compute the LM head only at ``positions`` ([batch, k] indices), or only at the last position
    when ``positions`` is None. The vocabulary projection dominates the cost of short probes on a
    small model (49k x 576 per token), so this is the evaluator's main saving. It works on any
    architecture: it slices the hidden state entering the output embedding, and whatever the model
    does after its head (e.g. Gemma's logit soft-capping) still applies."""
    head = model.get_output_embeddings()  # type: ignore[operator]

    def select(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h = args[0]
        if positions is None:
            return (h[:, -1:], *args[1:])
        idx = positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return (h.gather(1, idx), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
