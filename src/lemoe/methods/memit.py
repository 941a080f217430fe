"""MEMIT (Meng et al., 2023): closed-form multi-layer key-value edits of MLP output projections.

Each batch: target vectors ``z`` at the last edited layer (:func:`compute_z`), then for each edited
layer from the bottom, the residual still missing at the last layer is spread over the remaining
layers and written with ``Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹``. Applied batch after batch this is
"sequential MEMIT" (each batch only protects ``C0``, not earlier edits); all edits in one batch is
MEMIT-MASS. The original weights of the edited layers are kept, so ``reset()`` is exact.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lemoe.methods.base import StateError
from lemoe.methods.locate import (
    LocateConfig,
    LocateEditMethod,
    add_to_weight,
    block_outputs,
    compute_ks,
    compute_z,
    memit_delta,
    spread_residual,
)
from lemoe.models.access import weight_as_out_in
from lemoe.requests import EditRequest


class MEMIT(LocateEditMethod):
    name = "memit"
    config_class = LocateConfig

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: LocateConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        self.originals = [weight_as_out_in(m).detach().clone() for m in self.out_projs]

    def covariance(self, layer: int) -> torch.Tensor:
        """The matrix protecting earlier behaviour at ``layer``: ``λ C0``."""
        return self.mom2_weight(layer) * self.mom2()[layer]

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        self.prepare()
        last = self.layers[-1]
        t0 = time.perf_counter()
        zs, info = compute_z(self.model, self.access, self.tokenizer, requests, last, self.cfg, self.z_templates())
        info["z_seconds"] = time.perf_counter() - t0
        norms = []
        for i, (layer, module) in enumerate(zip(self.layers, self.out_projs, strict=True)):
            ks = compute_ks(self.access, self.tokenizer, layer, requests, self.key_templates())
            current = block_outputs(self.access, self.tokenizer, last, requests)
            resid = spread_residual(zs, current, len(self.layers) - i)
            delta = self.layer_delta(layer, resid, ks)
            add_to_weight(module, delta)
            self.after_layer(layer, ks)
            norms.append(float(delta.norm()))
        write_seconds = time.perf_counter() - t0 - info["z_seconds"]
        return {**self.take_info(), **info, "delta_norms": norms, "write_seconds": write_seconds}

    def layer_delta(self, layer: int, resid: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return memit_delta(resid, keys, self.covariance(layer))

    def after_layer(self, layer: int, keys: torch.Tensor) -> None:
        """Hook for subclasses that accumulate the keys they wrote (AlphaEdit)."""

    def reset(self) -> None:
        with torch.no_grad():
            for module, original in zip(self.out_projs, self.originals, strict=True):
                weight_as_out_in(module).copy_(original)
        self.batches_applied = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"delta.{layer}": weight_as_out_in(m).detach() - w0
            for layer, m, w0 in zip(self.layers, self.out_projs, self.originals, strict=True)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._load_meta(meta)
        expected = {f"delta.{layer}" for layer in self.layers}
        if not expected <= set(state):
            raise StateError(f"saved state lacks {sorted(expected - set(state))}")
        for layer, w0 in zip(self.layers, self.originals, strict=True):
            delta = state[f"delta.{layer}"]
            if delta.shape != w0.shape:
                raise StateError(f"delta.{layer} has shape {tuple(delta.shape)}, expected {tuple(w0.shape)}")
        with torch.no_grad():
            for layer, module, w0 in zip(self.layers, self.out_projs, self.originals, strict=True):
                weight_as_out_in(module).copy_(w0 + state[f"delta.{layer}"].to(w0))
