"""Candidate keys from a nearest-neighbour index over the subject-key slots (faiss HNSW).

Scoring every key against every prompt token costs ``tokens × slots × d`` multiply-adds: at
10,000 edits that is about 100,000 slots, and the router then does more work per forward than
the block it routes. A key can only pass its threshold if one of its slots is at least that close
to some token (a window's score is a mean of aligned cosines, so its best slot bounds it from
above). The index returns each token's ``neighbours`` nearest slots; the keys of those at or above
their own threshold are the candidates, and only they are scored exactly. The decision is exact
whenever every passing key has a slot among some token's neighbours; ``benchmarks/lemoe_index.py``
measures how often that holds against brute force.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - exercised where faiss is absent
        raise ImportError(
            "route_index=hnsw needs faiss: pip install 'lemoe[index]' (faiss-cpu), or use route_index=exact"
        ) from e
    return faiss


class SlotIndex:
    """An HNSW graph (inner product on unit vectors) over the slots, grown as keys are appended."""

    def __init__(self, d: int, neighbours: int, *, m: int = 32, ef_search: int = 128) -> None:
        faiss = _faiss()
        self.neighbours = neighbours
        self.index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 80
        self.index.hnsw.efSearch = max(ef_search, neighbours)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def add(self, slots: torch.Tensor) -> None:
        if slots.shape[0]:
            self.index.add(np.ascontiguousarray(slots.detach().float().cpu().numpy()))

    def candidate_slots(
        self, tokens: torch.Tensor, slot_key: torch.Tensor, slot_threshold: torch.Tensor
    ) -> torch.Tensor:
        """Boolean ``[S]``: the slots of every key that one of ``tokens [N, d]`` comes close enough
        to (a neighbour slot at or above its key's threshold)."""
        n_slots = slot_key.shape[0]
        out = torch.zeros(n_slots, dtype=torch.bool, device=slot_key.device)
        if tokens.shape[0] == 0 or n_slots == 0:
            return out
        k = min(self.neighbours, n_slots)
        sims, ids = self.index.search(np.ascontiguousarray(tokens.detach().float().cpu().numpy()), k)
        sims_t = torch.from_numpy(sims).to(slot_threshold.device)
        ids_t = torch.from_numpy(ids).to(slot_key.device).long()
        found = ids_t >= 0
        hit = found & (sims_t >= slot_threshold[ids_t.clamp(min=0)])
        keys = torch.unique(slot_key[ids_t[hit]])
        return torch.isin(slot_key, keys)
