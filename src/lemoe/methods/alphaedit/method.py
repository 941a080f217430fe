"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with the update projected onto a null space.

``P`` projects onto the span of ``C0``'s near-zero eigen-directions, where preserved knowledge
has (almost) no keys, so ``Δ P`` leaves preserved outputs unchanged. Keys of earlier edits are
accumulated in ``cache_c`` so later batches also keep them. Per layer and batch:
``Δ = R Kᵀ P (P (cache_c + K Kᵀ) + l2·I)⁻¹`` (the paper's solve, transposed), then
``cache_c += K Kᵀ``. Everything lives in the method object (no globals); ``reset()`` is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from lemoe.methods.alphaedit.config import AlphaEditConfig
from lemoe.methods.base import StateError
from lemoe.methods.memit import MEMIT


def nullspace_projection(mom2: torch.Tensor, threshold: float, relative: bool = False) -> tuple[torch.Tensor, int]:
    """``P = U₀ U₀ᵀ`` over the eigenvectors of ``mom2`` with eigenvalue below the threshold."""
    values, vectors = torch.linalg.eigh(mom2.double())
    cut = threshold * float(values.max()) if relative else threshold
    null = vectors[:, values < cut]
    return null @ null.T, int(null.shape[1])


def alphaedit_delta(
    resid: torch.Tensor, keys: torch.Tensor, projection: torch.Tensor, cache_c: torch.Tensor, l2: float
) -> torch.Tensor:
    """``[d_out, d_in]`` update; solved in float64."""
    k, p = keys.double(), projection.double()
    eye = torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
    a = p @ (cache_c.double() + k.T @ k) + l2 * eye
    return torch.linalg.solve(a, p @ k.T @ resid.double()).T


class AlphaEdit(MEMIT):
    name = "alphaedit"
    config_class = AlphaEditConfig

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: AlphaEditConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        self._projections: dict[int, torch.Tensor] | None = None
        self.null_dims: dict[int, int] = {}
        d_in = {layer: m.shape[1] for layer, m in zip(self.layers, self.originals, strict=True)}
        self.cache_c = {
            layer: torch.zeros(d_in[layer], d_in[layer], dtype=torch.float64, device=self.access.device)
            for layer in self.layers
        }

    def projections(self) -> dict[int, torch.Tensor]:
        if self._projections is None:
            cfg: AlphaEditConfig = self.config  # type: ignore[assignment]
            self._projections = {}
            for layer, mom2 in self.mom2().items():
                p, dims = nullspace_projection(mom2, cfg.nullspace_threshold, cfg.nullspace_relative)
                self._projections[layer], self.null_dims[layer] = p, dims
        return self._projections

    def _apply(self, requests: list[Any]) -> dict[str, Any]:
        self.prepare()
        self.projections()
        info = super()._apply(requests)
        return {**info, "null_dims": [self.null_dims[layer] for layer in self.layers]}

    def layer_delta(self, layer: int, resid: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        cfg: AlphaEditConfig = self.config  # type: ignore[assignment]
        return alphaedit_delta(resid, keys, self.projections()[layer], self.cache_c[layer], cfg.l2)

    def after_layer(self, layer: int, keys: torch.Tensor) -> None:
        k = keys.double()
        self.cache_c[layer] += k.T @ k

    def reset(self) -> None:
        super().reset()
        for c in self.cache_c.values():
            c.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **{f"cache_c.{layer}": c.clone() for layer, c in self.cache_c.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for layer, c in self.cache_c.items():
            saved = state.get(f"cache_c.{layer}")
            if saved is None or saved.shape != c.shape:
                raise StateError(f"saved cache_c.{layer} is missing or has the wrong shape")
        super().load_state_dict(state, meta)
        for layer, c in self.cache_c.items():
            c.copy_(state[f"cache_c.{layer}"].double())
