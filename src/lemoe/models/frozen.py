"""Reuse the frozen computation below an edited layer.

Methods that train something at layer L (FT, LEMoE experts, hyper-network targets) run the same
batch through the model for many optimisation steps. Blocks ``0..L-1`` are frozen, so their output
on that batch never changes: compute it once, then, inside :func:`skip_frozen_blocks`, replace
those blocks by pass-throughs and feed the cached hidden state into block L. This works for any
architecture :class:`ModelAccess` supports, because it touches only the block list and block L's
input, not the model's own forward code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lemoe.models.access import ModelAccess


class _PassThrough(nn.Module):
    """Stands in for a frozen block: returns its input hidden state in the block's output format."""

    def __init__(self, tuple_output: bool) -> None:
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if hidden_states is None:
            hidden_states = args[0]
        return (hidden_states,) if self.tuple_output else hidden_states


@torch.no_grad()
def hidden_before_block(
    access: ModelAccess, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, **forward: Any
) -> tuple[torch.Tensor, bool]:
    """Hidden state entering block ``layer`` for this batch, and whether blocks return tuples.

    ``forward``: more arguments of the model's forward (e.g. a KV cache of a shared prefix, with
    ``attention_mask`` then covering prefix and batch). Default: no cache."""
    captured: dict[str, Any] = {}

    def grab(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        raise _StopForward

    def shape_of_output(_mod: nn.Module, _args: Any, output: Any) -> None:
        captured["tuple"] = isinstance(output, tuple)

    h1 = access.blocks[0].register_forward_hook(shape_of_output)
    h2 = access.blocks[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        access.model(input_ids=input_ids, attention_mask=attention_mask, **({"use_cache": False} | forward))
    except _StopForward:
        pass
    finally:
        h1.remove()
        h2.remove()
    if layer == 0:
        captured.setdefault("tuple", False)
    return captured["h"].detach(), bool(captured["tuple"])


class _StopForward(Exception):
    pass


@contextmanager
def skip_frozen_blocks(
    access: ModelAccess, layer: int, cached_hidden: torch.Tensor, tuple_output: bool
) -> Iterator[None]:
    """Within the block, blocks below ``layer`` are skipped and block ``layer`` receives
    ``cached_hidden``. Only valid for the exact batch the cache was computed on."""
    if layer == 0:
        yield
        return
    originals = [access.blocks[i] for i in range(layer)]

    def feed(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": cached_hidden}
        else:
            args = (cached_hidden, *args[1:])
        return args, kwargs

    handle = access.blocks[layer].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        for i in range(layer):
            access.blocks[i] = _PassThrough(tuple_output)
        yield
    finally:
        for i, block in enumerate(originals):
            access.blocks[i] = block
        handle.remove()
