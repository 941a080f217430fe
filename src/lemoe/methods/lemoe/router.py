"""KV anchor routing: pure functions on routing embeddings, anchor keys and the null threshold.

A routing embedding is one vector per sequence: a frozen representation (the input of a low block,
by default block 1) standardised per dimension with statistics of generic text, mean-pooled over
the prompt tokens and scaled to unit length. Standardising matters: raw hidden states are dominated
by a few huge dimensions shared by every sentence, so raw cosines are all near 1.

Two kinds of anchor keys (option ``route_key``):

- ``prompt``: each expert keeps the routing embeddings of the prompts it was trained on. A sequence
  goes to the expert of its highest-scoring key (top-1; ties go to the newest expert), or to no
  expert (the null route, ``NULL``) when that score is below one global threshold, calibrated on
  generic text alone: how close two *unrelated* generic prompts can get to each other.
- ``subject`` (default): a key is the *span* of per-token vectors of the edit's subject in its
  prompt. A sequence is scored against a key by sliding that span over its prompt tokens (mean
  cosine of aligned tokens, best window), so a subject is recognised wherever it occurs, whatever
  the words around it. Each key has its own threshold: the best window score any calibration text
  reaches against it, plus a margin, so a subject made of common words needs a closer match than
  a distinctive name. Keys are stored flat, one row per subject token ("slot"), with the key each
  slot belongs to and its offset from the key's last token.
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


# -- subject-span keys -------------------------------------------------------------------------------
def span_from_offsets(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token indices overlapping characters ``[start, end)`` (special tokens have empty offsets)."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]


def span_slots(spans: list[torch.Tensor], first_key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten unit token vectors of each key's span (``[m_i, d]``) into slots: vectors ``[S, d]``,
    key index ``[S]`` (``first_key`` upwards) and offset from the key's last token ``[S]``."""
    vecs = torch.cat(spans)
    key = torch.cat([torch.full((s.shape[0],), first_key + i, dtype=torch.long) for i, s in enumerate(spans)])
    offset = torch.cat([torch.arange(s.shape[0] - 1, -1, -1, dtype=torch.long) for s in spans])
    return vecs, key.to(vecs.device), offset.to(vecs.device)


def span_window_scores(
    q: torch.Tensor,
    valid: torch.Tensor,
    slots: torch.Tensor,
    slot_key: torch.Tensor,
    slot_offset: torch.Tensor,
    max_cells: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score of every key's window ending at every position.

    ``q [B, T, d]`` unit token vectors, ``valid [B, T]`` the tokens that may match (the prompt).
    A window ending at token ``t`` aligns a key's slot with offset ``o`` to token ``t - o``; its
    score is the mean cosine over the key's slots, a slot outside the sequence or on an invalid
    token counting -1 (a window ending on an invalid token scores -inf). Returns ``[B, T, K]``
    scores and the ``K`` key indices they belong to (ascending). Processed in row chunks so
    ``B·T·S`` stays under ``max_cells``.
    """
    keys, inv = torch.unique(slot_key, return_inverse=True)
    n_keys = keys.numel()
    length = torch.zeros(n_keys, device=q.device).index_add_(0, inv, torch.ones_like(inv, dtype=torch.float32))
    b, t = q.shape[:2]
    rows = max(1, max_cells // max(1, t * max(1, slots.shape[0])))
    out = []
    for i in range(0, b, rows):
        qc, vc = q[i : i + rows].float(), valid[i : i + rows]
        sims = (qc @ slots.T.float()).masked_fill(~vc[..., None], -1.0)  # [b, T, S]
        total = torch.zeros(qc.shape[0], t, n_keys, device=q.device)
        for o in torch.unique(slot_offset).tolist():
            sel = slot_offset == o
            part = sims[:, :, sel]
            if o > 0:
                fill = torch.full((part.shape[0], min(o, t), part.shape[2]), -1.0, device=q.device)
                part = torch.cat([fill, part[:, : max(t - o, 0)]], 1)
            total.index_add_(2, inv[sel], part)
        out.append((total / length).masked_fill(~vc[..., None], float("-inf")))
    scores = torch.cat(out) if out else torch.zeros(0, t, n_keys, device=q.device)
    return scores, keys


def span_scores(
    q: torch.Tensor,
    valid: torch.Tensor,
    slots: torch.Tensor,
    slot_key: torch.Tensor,
    slot_offset: torch.Tensor,
    max_cells: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best window score of every key for every sequence (``[B, K]``, see :func:`span_window_scores`)."""
    keys = torch.unique(slot_key)
    rows = max(1, max_cells // max(1, q.shape[1] * max(1, slots.shape[0], keys.numel())))
    out = [
        span_window_scores(q[i : i + rows], valid[i : i + rows], slots, slot_key, slot_offset, max_cells)[0]
        .max(1)
        .values
        for i in range(0, q.shape[0], rows)
    ]
    return (torch.cat(out) if out else torch.zeros(0, keys.numel(), device=q.device)), keys


def per_key(values: torch.Tensor, slot_key: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """A per-slot value that is constant within a key (its expert, its threshold), per key."""
    pos = torch.searchsorted(keys, slot_key)
    return torch.zeros(keys.numel(), dtype=values.dtype, device=values.device).scatter_(0, pos, values)


def route_spans(scores: torch.Tensor, threshold: torch.Tensor | None, expert: torch.Tensor) -> torch.Tensor:
    """Expert of the best-scoring key among those at or above their own threshold (ties go to the
    newest key); ``NULL`` when none is. ``threshold=None`` disables the null route."""
    b = scores.shape[0]
    if scores.shape[1] == 0:
        return torch.full((b,), NULL, dtype=torch.long, device=scores.device)
    ok = torch.ones_like(scores, dtype=torch.bool) if threshold is None else scores >= threshold
    masked = scores.masked_fill(~ok, float("-inf"))
    best = scores.shape[1] - 1 - masked.flip(-1).argmax(-1)
    choice = expert.to(scores.device)[best]
    return torch.where(ok.any(1), choice, torch.full_like(choice, NULL))


def span_thresholds(calibration_scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-key threshold: the best score any calibration text reaches (``[N, K] -> [K]``) plus a
    margin, capped below 1 so the edit's own prompt (score 1) always reaches its expert."""
    return (calibration_scores.max(0).values + margin).clamp(max=0.999)
