"""KV anchor routing: pure functions on routing embeddings, anchor keys and the null threshold.

A routing embedding is one vector per sequence: a frozen representation (the input of a low block,
by default block 1) standardised per dimension with statistics of generic text, mean-pooled over
the prompt tokens and scaled to unit length. Standardising matters: raw hidden states are dominated
by a few huge dimensions shared by every sentence, so raw cosines are all near 1.

Each expert owns keys (anchors): the routing embeddings of the prompts it was trained on. A
sequence goes to the expert of its highest-scoring key (top-1; ties go to the newest expert), or
to no expert (the null route, ``NULL``) when that score is below the threshold. The threshold is
calibrated on generic text alone: how close two *unrelated* generic prompts can get to each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NULL = -1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[b, t]`` over positions where ``mask[b, t]``; ``[B, T, d] -> [B, d]``."""
    m = mask.to(values.dtype).unsqueeze(-1)
    return (values * m).sum(1) / m.sum(1).clamp(min=1.0)


def standardise(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-dimension z-score against generic-text statistics (float32)."""
    return (values.float() - mean) / std


def queries(hidden: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Routing embeddings ``[B, d]`` of ``hidden [B, T, d]`` pooled over ``mask [B, T]``."""
    return F.normalize(masked_mean(standardise(hidden, mean, std), mask), dim=-1)


def token_queries(hidden: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-token routing vectors ``[..., d]`` (token-level gating)."""
    return F.normalize(standardise(hidden, mean, std), dim=-1)


def route(
    q: torch.Tensor, keys: torch.Tensor, key_expert: torch.Tensor, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 expert for each query ``[..., d]`` and its score; ``NULL`` below ``threshold`` or
    when there are no keys."""
    lead = q.shape[:-1]
    if keys.shape[0] == 0:
        return torch.full(lead, NULL, dtype=torch.long, device=q.device), torch.full(lead, -1.0, device=q.device)
    sims = q @ keys.T  # [..., A]
    a = keys.shape[0] - 1 - sims.flip(-1).argmax(-1)  # argmax takes the first maximum: prefer the newest key
    top = sims.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    choice = key_expert.to(q.device)[a]
    if threshold is not None:
        choice = torch.where(top >= threshold, choice, torch.full_like(choice, NULL))
    return choice, top


def standardisation(hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per dimension over the tokens of generic texts (``[T_i, d]`` each), leaving
    out each text's first token (an attention sink with outsized activations)."""
    tokens = torch.cat([h[1:] if h.shape[0] > 1 else h for h in hidden]).float()
    return tokens.mean(0), tokens.std(0) + 1e-3


def nearest_unrelated(q: torch.Tensor) -> torch.Tensor:
    """For each generic query, its highest score against any *other* generic query."""
    sims = q @ q.T
    sims.fill_diagonal_(-1.0)
    return sims.max(1).values


def calibrate_threshold(generic_queries: torch.Tensor, quantile: float, margin: float) -> float:
    """The null-route threshold: a quantile (default the max) of how close unrelated generic
    prompts get to each other, plus a margin. Capped below 1 so an edit's own prompt (score 1)
    always reaches its expert."""
    base = float(torch.quantile(nearest_unrelated(generic_queries.float()), quantile))
    return min(base + margin, 0.999)
