"""Router calibration: what generic text looks like at the routing layer.

Everything here depends on the base model and the calibration texts only, never on an edit: the
per-dimension standardisation of routing-layer states, the null threshold of ``route_key=prompt``
(how close two unrelated generic prompts get), the token threshold of ``routing=token``, and for
``route_key=subject`` the calibration texts' token vectors against which each new key's own
threshold is set. The statistics are saved with the edited state; the token vectors are recomputed
on demand (they are large and derived).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lemoe.methods.lemoe import router

TokenBatch = tuple[torch.Tensor, torch.Tensor]  # unit vectors [B, T, d] and which may match [B, T]


@dataclass
class Calibration:
    mean: torch.Tensor | None = None  # [d] per-dimension mean of generic tokens
    std: torch.Tensor | None = None  # [d]
    threshold: float | None = None  # the null threshold of pooled prompt embeddings
    token_threshold: float | None = None  # routing=token: the same rule, per token
    token_vectors: TokenBatch | None = None  # route_key=subject: calibration tokens (runtime only)

    @property
    def ready(self) -> bool:
        return self.mean is not None and self.threshold is not None

    def fit(self, hidden: list[torch.Tensor], quantile: float, margin: float, *, keep_tokens: bool) -> None:
        """Statistics and the null threshold from the routing-layer states of calibration texts."""
        self.mean, self.std = router.standardisation(hidden)
        self.threshold = router.calibrate_threshold(self.pool(hidden), quantile, margin)
        if keep_tokens:
            self.token_vectors = self.token_batch(hidden, None)

    def fit_token_threshold(self, hidden: list[torch.Tensor], quantile: float, margin: float) -> None:
        """How close a generic token gets to another generic prompt's routing embedding."""
        q = self.pool(hidden)
        best = []
        for i, h in enumerate(hidden):
            s = self.tokens(h) @ q.T
            s[:, i] = -1.0
            best.append(s.max(1).values)
        t = float(torch.quantile(torch.cat(best), quantile)) + margin
        self.token_threshold = min(t, 0.999)

    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unit standardised token vectors of routing-layer states ``[..., d]``."""
        assert self.mean is not None and self.std is not None, "calibrate first"
        return router.token_queries(hidden, self.mean, self.std)

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit routing embeddings ``[B, d]`` of ``hidden [B, T, d]`` pooled over ``mask``."""
        assert self.mean is not None and self.std is not None, "calibrate first"
        return router.queries(hidden, mask, self.mean, self.std)

    def pool(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """One unit routing embedding per text (``[T_i, d]`` each), pooled over all its tokens."""
        ones = [torch.ones(1, h.shape[0], dtype=torch.bool, device=h.device) for h in hidden]
        return torch.stack([self.pooled(h[None], m)[0] for h, m in zip(hidden, ones, strict=True)])

    def token_batch(self, hidden: list[torch.Tensor], flags: list[torch.Tensor] | None) -> TokenBatch:
        """Texts of different lengths as one padded batch of unit token vectors, with which
        positions may match (all real tokens, or ``flags``)."""
        width = max(h.shape[0] for h in hidden)
        d = hidden[0].shape[-1]
        q = torch.zeros(len(hidden), width, d, device=hidden[0].device)
        valid = torch.zeros(len(hidden), width, dtype=torch.bool, device=hidden[0].device)
        for r, h in enumerate(hidden):
            q[r, : h.shape[0]] = self.tokens(h)
            valid[r, : h.shape[0]] = True if flags is None else flags[r].to(valid.device)
        return q, valid

    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.ready and self.std is not None and self.mean is not None
        return {
            "router.mean": self.mean,
            "router.std": self.std,
            "router.threshold": torch.tensor([self.threshold], dtype=torch.float64),
        }

    def load(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Take saved statistics (already validated); derived runtime values are recomputed."""
        self.mean = state["router.mean"].to(device, torch.float32)
        self.std = state["router.std"].to(device, torch.float32)
        self.threshold = float(state["router.threshold"])
        self.token_vectors = None
