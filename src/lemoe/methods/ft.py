"""FT-L and FT-M: fine-tune one MLP projection of one layer on the edit batch.

- **FT-L** trains on the whole ``prompt + target`` sequence (language-modelling loss on every token)
  with the weight change clamped to an L-infinity ball around the original weights (ROME's FT-L).
- **FT-M** masks the loss to the target tokens (WISE's FT-M), same clamp option.

Both are the runner's reference methods and the lifelong baseline rows. The frozen blocks below the
edited layer are computed once per batch and reused across optimisation steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from lemoe.methods.base import EditMethod, MethodConfig
from lemoe.methods.training import build_lm_batch, target_token_accuracy, token_nll
from lemoe.models.frozen import hidden_before_block, skip_frozen_blocks
from lemoe.requests import EditRequest


@dataclass
class FTConfig(MethodConfig):
    layer: int | None = None  # None: ModelAccess.default_edit_layer()
    module: Literal["out", "in"] = "out"  # the MLP output projection, or its first input projection
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = None  # L-inf bound on the weight change; None: unbounded
    stop_accuracy: float = 1.0  # stop once every target token of the batch is predicted
    weight_decay: float = 0.0


class _FineTune(EditMethod):
    targets_only: bool

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: FTConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        cfg: FTConfig = self.config  # type: ignore[assignment]
        self.layer = cfg.layer if cfg.layer is not None else self.access.default_edit_layer()
        self.config = cfg.replace(layer=self.layer)  # results and saved states name the real layer
        parts = self.access.mlp(self.layer)
        self.module = parts.out_proj if cfg.module == "out" else parts.input_module
        self.original = self.module.weight.detach().clone()

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        cfg: FTConfig = self.config  # type: ignore[assignment]
        device = self.access.device
        batch = build_lm_batch(self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests]).to(
            device
        )
        hidden, tuple_out = hidden_before_block(self.access, self.layer, batch.input_ids, batch.attention_mask)
        weight = self.module.weight
        weight.requires_grad_(True)
        opt = torch.optim.Adam([weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_run, loss_value = 0, float("nan")
        try:
            with skip_frozen_blocks(self.access, self.layer, hidden, tuple_out):
                for _ in range(cfg.steps):
                    logits = self.model(
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                    ).logits
                    if float(target_token_accuracy(logits, batch).min()) >= cfg.stop_accuracy and steps_run > 0:
                        break
                    loss = token_nll(logits, batch, targets_only=self.targets_only).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps_run += 1
                    loss_value = loss.item()
                    if cfg.norm_constraint is not None:
                        with torch.no_grad():
                            delta = (weight - self.original).clamp(-cfg.norm_constraint, cfg.norm_constraint)
                            weight.copy_(self.original + delta)
        finally:
            weight.requires_grad_(False)
            weight.grad = None
        return {"steps": steps_run, "loss": loss_value}

    def reset(self) -> None:
        with torch.no_grad():
            self.module.weight.copy_(self.original)
        self.batches_applied = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"delta": self.module.weight.detach() - self.original}

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            self.module.weight.copy_(self.original + state["delta"].to(self.original))
        self.batches_applied = int(meta.get("batches_applied", 0))


class FTL(_FineTune):
    name = "ft-l"
    config_class = FTConfig
    targets_only = False


class FTM(_FineTune):
    name = "ft-m"
    config_class = FTConfig
    targets_only = True
