"""FFN-shaped experts and their batched application.

An expert is ``f(x) = W2 act(W1 x + b1) + b2`` with ``W2 = b2 = 0`` at creation, so a new expert is
an exact no-op until trained. Frozen experts live stacked in one :class:`ExpertBank` (``[E, ...]``
tensors); applying them gathers the chosen expert per sequence and runs one batched matmul, so
the cost per token is one expert's whatever the number of experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lemoe.methods.lemoe.rows import RowBuffer, append_rows

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class Expert(nn.Module):
    """One trainable expert (the one being trained for the current batch)."""

    def __init__(self, d_in: int, d_out: int, width: int, init_std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(width, d_in, generator=generator) * init_std)
        self.b1 = nn.Parameter(torch.zeros(width))
        self.w2 = nn.Parameter(torch.zeros(d_out, width))
        self.b2 = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return F.linear(act(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


@dataclass
class ExpertBank:
    """Frozen experts stacked along dim 0: ``w1 [E, w, d]``, ``b1 [E, w]``, ``w2 [E, d, w]``, ``b2 [E, d]``."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    buffer: RowBuffer | None = field(default=None, repr=False, compare=False)  # room to append into

    @classmethod
    def empty(cls, d_in: int, d_out: int, width: int, dtype: torch.dtype, device: torch.device) -> ExpertBank:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(z(0, width, d_in), z(0, width), z(0, d_out, width), z(0, d_out))

    def __len__(self) -> int:
        return self.w1.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def append(self, expert: Expert) -> ExpertBank:
        """A new bank with ``expert`` (detached, copied) at the end; earlier experts bit-identical,
        and this bank's tensors unchanged (the new row goes past their end, :mod:`.rows`)."""
        new = {k: getattr(expert, k).detach().unsqueeze(0) for k in self.tensors()}
        views, buffer = append_rows(self.tensors(), new, self.buffer)
        return ExpertBank(**views, buffer=buffer)

    def replace(self, index: int, expert: Expert) -> ExpertBank:
        """A new bank with expert ``index`` replaced (shared-expert mode)."""
        out = {k: v.clone() for k, v in self.tensors().items()}
        for k, v in out.items():
            v[index] = getattr(expert, k).detach().to(v)
        return ExpertBank(**out)

    def remove(self, index: int) -> ExpertBank:
        keep = [i for i in range(len(self)) if i != index]
        idx = torch.tensor(keep, dtype=torch.long, device=self.w1.device)
        return ExpertBank(**{k: v.index_select(0, idx) for k, v in self.tensors().items()})

    def load_into(self, index: int, expert: Expert) -> None:
        """Copy frozen expert ``index`` into a trainable expert (shared-expert mode)."""
        with torch.no_grad():
            for k, v in self.tensors().items():
                getattr(expert, k).copy_(v[index])


def apply_per_sequence(
    bank: ExpertBank, x: torch.Tensor, choice: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor | None:
    """Expert output for ``x [B, T, d]`` with one expert per sequence (``choice [B]``, -1: none).
    Returns ``None`` when no sequence is routed (the caller then leaves the MLP output alone)."""
    rows = (choice >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    e = choice[rows]
    xr = x.index_select(0, rows)  # [R, T, d]
    w1, b1, w2, b2 = (t[e].to(x.dtype) for t in (bank.w1, bank.b1, bank.w2, bank.b2))  # the routed ones
    h = act(torch.baddbmm(b1.unsqueeze(1), xr, w1.transpose(1, 2)))  # [R, T, w]
    y = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # [R, T, d]
    out = torch.zeros_like(x)
    return out.index_copy(0, rows, y.to(x.dtype))


def apply_per_token(
    bank: ExpertBank, x: torch.Tensor, choice: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor | None:
    """Expert output with one expert per token (``choice [B, T]``, -1: none): token-level gating."""
    if not bool((choice >= 0).any()):
        return None
    out = torch.zeros_like(x)
    for e in choice[choice >= 0].unique().tolist():
        sel = choice == e
        xe = x[sel]
        w1, b1, w2, b2 = (t[e].to(x.dtype) for t in (bank.w1, bank.b1, bank.w2, bank.b2))
        y = F.linear(act(F.linear(xe, w1, b1)), w2, b2)
        out[sel] = y.to(x.dtype)
    return out
