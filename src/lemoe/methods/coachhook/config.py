"""CoachHooK options: the locate-then-edit core's plus the scope threshold α."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lemoe.methods.locate.config import LocateConfig


@dataclass
class CoachHooKConfig(LocateConfig):
    alpha_init: float = 2.2  # z-score a token needs to take the hook weights (the paper's start value)
    dynamic_alpha: bool = True  # after each batch: α ← min(α, min over the batch's prompts of max z)
    alpha_floor: float | None = None  # optional lower bound on α (None: the paper's rule, unbounded)
    # False: an ablation without the z-score scope rule; the hook weights act at every token (the
    # consecutive-batch update with C_accu alone, as in sequential MEMIT with accumulated keys).
    scope_rule: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.alpha_init, (int, float)) or not math.isfinite(self.alpha_init):
            raise ValueError(f"alpha_init must be a finite number, got {self.alpha_init!r}")
        if self.alpha_floor is not None and (
            not isinstance(self.alpha_floor, (int, float)) or not self.alpha_floor <= self.alpha_init
        ):
            raise ValueError(f"alpha_floor must be a number <= alpha_init, got {self.alpha_floor!r}")
        for name in ("dynamic_alpha", "scope_rule"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
