"""Shared scaffolding of locate-then-edit methods: layers, templates and statistics, lazily.

Subclasses implement ``_apply`` with :func:`compute_z`, :func:`compute_ks` and the update rule.
Statistics and context templates are computed on first use, on the unedited model, and their
timing is reported once (``stats_seconds``) in the first batch's info.
"""

from __future__ import annotations

from typing import Any

import torch

from lemoe.methods.base import EditMethod
from lemoe.methods.locate.config import LocateConfig
from lemoe.methods.locate.positions import context_templates
from lemoe.methods.locate.stats import layer_stats
from lemoe.methods.locate.update import default_layers


class LocateEditMethod(EditMethod):
    """Base of MEMIT, AlphaEdit and CoachHooK."""

    config_class = LocateConfig

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: LocateConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        cfg: LocateConfig = self.config  # type: ignore[assignment]
        cfg.validate()
        n = self.access.num_layers
        layers = list(cfg.layers) if cfg.layers is not None else default_layers(n)
        for layer in layers:
            if not 0 <= layer < n:
                raise ValueError(f"layer {layer} out of range for a {n}-layer model")
        self.layers = sorted(layers)
        self.out_projs = [self.access.mlp(layer).out_proj for layer in self.layers]
        self._mom2: dict[int, torch.Tensor] | None = None
        self._templates: list[str] | None = None
        self._pending_info: dict[str, Any] = {}

    @property
    def cfg(self) -> LocateConfig:
        return self.config  # type: ignore[return-value]

    def mom2(self) -> dict[int, torch.Tensor]:
        """``C0`` per edited layer (float64, on the model's device); computed or read from the disk cache once."""
        if self._mom2 is None:
            c = self.cfg
            mom2, report = layer_stats(
                self.model, self.access, self.tokenizer, self.layers, c.stats_corpus, c.stats_samples,
                c.stats_max_tokens, c.stats_batch_size, c.seed, fingerprint=self.base_fingerprint,
            )  # fmt: skip
            self._mom2 = {layer: m.to(self.access.device) for layer, m in mom2.items()}
            self._pending_info.update(report)
        return self._mom2

    def mom2_weight(self, layer: int) -> float:
        """λ for ``layer``: the configured value, or 15000 scaled by the key width / 16384."""
        if self.cfg.mom2_weight is not None:
            return float(self.cfg.mom2_weight)
        return 15000.0 * self.access.mlp(layer).intermediate_size / 16384

    def templates(self) -> list[str]:
        if self._templates is None:
            c = self.cfg
            self._templates = context_templates(
                self.model, self.tokenizer, max(c.key_contexts, c.z_contexts), c.context_length, c.seed
            )
        return self._templates

    def key_templates(self) -> list[str]:
        return self.templates()[: 1 + self.cfg.key_contexts]

    def z_templates(self) -> list[str]:
        return self.templates()[: 1 + self.cfg.z_contexts]

    def prepare(self) -> None:
        """Statistics and templates, computed on the model as it is now (call before editing)."""
        self.mom2()
        self.templates()

    def take_info(self) -> dict[str, Any]:
        info, self._pending_info = self._pending_info, {}
        return info

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "layers": self.layers, "templates": self._templates}

    def _load_meta(self, meta: dict[str, Any]) -> None:
        if "layers" in meta and list(meta["layers"]) != self.layers:
            from lemoe.methods.base import StateError

            raise StateError(f"saved state edits layers {meta['layers']}, this config edits {self.layers}")
        if meta.get("templates"):
            self._templates = list(meta["templates"])
        self.batches_applied = int(meta.get("batches_applied", 0))
