"""Pure linear algebra of the bases: projection, the soft penalty, GPM basis growth, top-q eigenspace.

An update ``dW`` is kept in ``[out, in]`` layout. A basis ``B`` is ``[D, r]`` with orthonormal
columns, where ``D = in`` (``side="in"``: directions of W_out's input, the MLP keys) or ``D = out``
(``side="out"``: directions of its output). On the input side, ``dW B = 0`` means the update does
not change W_out's output on any key in span(B) — the property that protects earlier edits and
pre-existing knowledge (GPM; AlphaEdit's null-space projection is the closed-form relative).
"""

from __future__ import annotations

import torch

from lemoe.methods.oedit.config import Side


def empty_basis(dim: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.zeros(dim, 0, device=device)


def as_columns(update: torch.Tensor, side: Side) -> torch.Tensor:
    """The update's vectors living in the basis space, as columns ``[D, *]``."""
    return update.T if side == "in" else update


def component_in(update: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """The part of ``update`` inside span(basis): ``dW B B^T`` (in) or ``B B^T dW`` (out)."""
    if basis.shape[1] == 0:
        return torch.zeros_like(update)
    b = basis.to(update)
    return (update @ b) @ b.T if side == "in" else b @ (b.T @ update)


def project_out(update: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """O-Edit+'s hard constraint: the update's component orthogonal to span(basis)."""
    return update - component_in(update, basis, side)


def overlap_penalty(update: torch.Tensor, basis: torch.Tensor, side: Side, eps: float = 1e-12) -> torch.Tensor:
    """O-Edit's soft loss: fraction of the update's energy inside span(basis), in [0, 1].

    Relative (scale-free) so one weight works for any learning rate and layer norm; its gradient
    is zero at ``dW = 0``, so the first step follows the edit loss alone."""
    if basis.shape[1] == 0:
        return update.new_zeros(())
    b = basis.to(update)
    inside = (update @ b) if side == "in" else (b.T @ update)
    return inside.pow(2).sum() / (update.pow(2).sum() + eps)


def orthonormal_complement_part(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``vectors`` minus their projection onto span(basis), twice (classical Gram-Schmidt re-run for
    numerical orthogonality)."""
    for _ in range(2):
        if basis.shape[1]:
            vectors = vectors - basis @ (basis.T @ vectors)
    return vectors


def new_directions(
    update: torch.Tensor, basis: torch.Tensor, side: Side, energy: float, room: int, tol: float = 1e-6
) -> torch.Tensor:
    """GPM basis growth: the fewest new orthonormal directions ``[D, r]`` (``r <= room``) such that
    span(basis + new) holds at least ``energy`` of the update's squared Frobenius norm.

    The part of the update already inside span(basis) counts toward the threshold (GPM's criterion),
    so a hard-projected update and a soft-penalised one are treated alike."""
    cols = as_columns(update.detach().float(), side)
    basis = basis.to(cols)
    total = float(cols.pow(2).sum())
    if total == 0.0 or room <= 0:
        return cols.new_zeros(cols.shape[0], 0)
    residual = orthonormal_complement_part(cols, basis)
    captured = total - float(residual.pow(2).sum())
    if captured / total >= energy:
        return cols.new_zeros(cols.shape[0], 0)
    u, s, _ = torch.linalg.svd(residual, full_matrices=False)
    keep = s > tol * max(float(s[0]), 1e-30)
    acc = captured + torch.cumsum(s.pow(2), 0)
    r = int((acc / total < energy).sum()) + 1
    r = min(r, int(keep.sum()), room)
    new = orthonormal_complement_part(u[:, :r], basis)
    q, _ = torch.linalg.qr(new)
    return q[:, :r]


def top_eigenspace(cov: torch.Tensor, rank: int, energy: float | None = None) -> torch.Tensor:
    """Orthonormal top eigenvectors ``[D, q]`` of a PSD matrix: the rank-q SVD of the data behind it.

    ``q = rank``, lowered to the smallest rank holding ``energy`` of the trace when that is set;
    directions with (numerically) zero eigenvalue are never kept."""
    cov = (cov.double() + cov.double().T) / 2
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    q = min(rank, int((vals > 1e-5 * max(float(vals[0]), 1e-30)).sum()))  # float32 round-off level
    if energy is not None and float(vals.sum()) > 0:
        frac = torch.cumsum(vals, 0) / vals.sum()
        q = min(q, int((frac < energy).sum()) + 1)
    return vecs[:, :q].float().contiguous()


def key_span(keys: torch.Tensor, basis: torch.Tensor | None, rel_tol: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis ``[D, r]`` of the batch's keys (``[tokens, D]``), first projected off
    span(basis) when one is given (O-Edit+ on the input side: every update ``A K^T`` is then
    orthogonal to the stored bases by construction).

    Why restrict to keys: for one edited W_out the gradient of the edit loss is ``sum_t d_t x_t^T``,
    so plain gradient descent only ever moves W_out inside the span of this batch's keys. Adam's
    per-coordinate scaling breaks that and spreads an edit over hundreds of directions, which
    would exhaust the basis after a few dozen edits; optimising ``A`` in ``dW = A K^T`` keeps
    Adam's speed and GPM's low-rank updates."""
    cols = keys.T.float()
    scale = float(torch.linalg.matrix_norm(cols, ord=2)) if cols.numel() else 0.0
    if basis is not None and basis.shape[1]:
        cols = orthonormal_complement_part(cols, basis.to(cols))
    if scale == 0.0:
        return cols.new_zeros(cols.shape[0], 0)
    u, s, _ = torch.linalg.svd(cols, full_matrices=False)
    return u[:, s > rel_tol * scale].contiguous()


def expand(factor: torch.Tensor, span: torch.Tensor | None) -> torch.Tensor:
    """The ``[out, in]`` update of a factor: ``A K^T`` (key-restricted) or ``A`` itself (full)."""
    return factor if span is None else factor @ span.to(factor).T


def project_factor(factor: torch.Tensor, span: torch.Tensor | None, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """Project the factor so its update ``expand(factor, span)`` is orthogonal to span(basis).

    Full updates are projected directly; key-restricted ones on the output side by projecting A's
    columns; on the input side the span was already built orthogonal to the basis (no-op here,
    the final fold re-projects anyway)."""
    if basis.shape[1] == 0:
        return factor
    if span is None:
        return project_out(factor, basis, side)
    if side == "out":
        b = basis.to(factor)
        return factor - b @ (b.T @ factor)
    return factor
