"""Least-squares aggregation by the normal equation, and its gradient (pure functions).

Given keys ``K`` [n, d_in] and wanted output changes ``D`` [n, d_out] for the n cached tokens of
one layer, the shift ``S`` [d_in, d_out] minimising ``||K S - D||² + λ||S||²`` is

    S = (KᵀK + λI)⁻¹ Kᵀ D.

It depends on the edits only through ``KᵀK`` and ``KᵀD``, so both are accumulated chunk by chunk
and one d_in x d_in system is solved, whatever the number of edits. Solved in float64: KᵀK of many
tokens is badly conditioned, and half-precision models must not solve in half precision.

Meta-training needs ``∂L/∂D`` and ``∂L/∂λ`` given ``G = ∂L/∂S``. With ``M = KᵀK + λI`` symmetric,
``∂L/∂D = K M⁻¹ G`` and ``∂L/∂λ = -⟨M⁻¹ G, S⟩``: one more solve, no autograd through the solve.
"""

from __future__ import annotations

import torch

SOLVE_DTYPE = torch.float64


def regularised_gram(gram: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """``KᵀK + λI`` in float64."""
    gram = gram.to(SOLVE_DTYPE)
    eye = torch.eye(gram.shape[0], dtype=SOLVE_DTYPE, device=gram.device)
    return gram + torch.as_tensor(lam, dtype=SOLVE_DTYPE, device=gram.device) * eye


def factorise(gram: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``KᵀK + λI`` (symmetric positive definite for λ > 0): half the work of
    a general solve, and shared by the shift and its gradient."""
    return torch.linalg.cholesky(regularised_gram(gram, lam))


def solve_shift(factor: torch.Tensor, keys_t_diffs: torch.Tensor) -> torch.Tensor:
    """``S = (KᵀK + λI)⁻¹ KᵀD`` from the factor of ``KᵀK + λI`` and the accumulated ``KᵀD``."""
    return torch.cholesky_solve(keys_t_diffs.to(SOLVE_DTYPE), factor)


def shift_backward(
    factor: torch.Tensor, shift: torch.Tensor, grad_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M⁻¹ G, ∂L/∂λ)``. Multiply the first by a chunk of keys to get that chunk's ``∂L/∂D``."""
    solved = torch.cholesky_solve(grad_shift.to(SOLVE_DTYPE), factor)
    grad_lam = -(solved * shift.to(SOLVE_DTYPE)).sum()
    return solved, grad_lam


def diff_grads(keys: torch.Tensor, solved: torch.Tensor) -> torch.Tensor:
    """``∂L/∂D`` for one chunk of keys: ``K_chunk M⁻¹ G``."""
    return keys.to(SOLVE_DTYPE) @ solved
