"""The "edit" half: spread a residual over layers and solve the key-value least squares."""

from __future__ import annotations

import torch
from torch import nn

from lemoe.models.access import weight_as_out_in


def default_layers(num_layers: int) -> list[int]:
    """A MEMIT-style lower-middle range: 4-8 of 30 layers (GPT-J's 3-8 of 28 is the same share)."""
    start = max(0, round(0.135 * num_layers))
    stop = min(num_layers - 1, max(start, round(0.27 * num_layers)))
    return list(range(start, stop + 1))


def spread_residual(targets: torch.Tensor, current: torch.Tensor, remaining: int) -> torch.Tensor:
    """MEMIT's spreading: the layer being edited takes ``1/remaining`` of what is still missing."""
    return (targets - current) / remaining


def memit_delta(resid: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``Δ = R Kᵀ (C + K Kᵀ)⁻¹`` as ``[d_out, d_in]`` (solved in float64).

    ``resid`` is ``[n, d_out]``, ``keys`` ``[n, d_in]``, ``cov`` the already-weighted ``C``
    (``λ C0`` for MEMIT, ``C_accu`` for CoachHooK).
    """
    k = keys.double()
    a = cov.double() + k.T @ k
    # A tiny ridge keeps the solve defined where no token ever activates a unit (dead ReLU units
    # give all-zero rows in C and K); it is negligible next to any direction that carries data.
    a.diagonal().add_(1e-9 * float(a.diagonal().mean()) + 1e-12)
    return torch.linalg.solve(a, k.T @ resid.double()).T


@torch.no_grad()
def add_to_weight(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    """Add ``Δ`` (``[out, in]``) to a Linear or GPT-2 Conv1D weight in place."""
    w = weight_as_out_in(module)
    w.add_(delta_out_in.to(dtype=w.dtype, device=w.device))
