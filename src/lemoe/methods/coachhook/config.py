"""CoachHooK options: the locate-then-edit core's plus the scope rule and its threshold α."""

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
    # What a token's swap is judged on. "zscore" (the paper): z-score of ‖(W_h − W_0) x_t‖ over the
    # sequence's tokens ≥ α. "relative" (lemoe's alternative): ‖(W_h − W_0) x_t‖ / ‖W_0 x_t‖ ≥ α, a
    # per-token test (no dependence on the rest of the sequence; one-token inputs can swap). With
    # "relative" α starts at alpha_init too: the default 2.2 (a 220 % change of the projection's
    # output) is above every ratio measured on SmolLM2, so the first batch's dynamic update sets it.
    # "key" (lemoe's second alternative): the largest C0-whitened cosine between the token's key and
    # the stored keys of the edits ≥ α (a cosine; alpha_init 2.2 is above every cosine, so the first
    # batch's dynamic update sets α). The state then also holds the edit keys and L⁻¹ of C0.
    scope_score: str = "zscore"
    # Dynamic α uses this quantile of the batch's per-prompt largest scores: 0.0 = the minimum (the
    # paper's rule: every edited prompt swaps somewhere); 0.1 lets the weakest 10 % of a batch's
    # prompts go without a swap at a layer, so one weak prompt cannot pull α down for everyone.
    alpha_quantile: float = 0.0
    # With scope_score="key": also store each edit's key as its own prompt produces it (the bare
    # prompt; the averaged key is read mostly behind context prefixes, and a subject that opens its
    # prompt sits next to the first position, where the two differ most). Recorded scores, which set
    # α, use the averaged keys only; the prompt keys only add matches at use.
    scope_prompt_keys: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.alpha_init, (int, float)) or not math.isfinite(self.alpha_init):
            raise ValueError(f"alpha_init must be a finite number, got {self.alpha_init!r}")
        if self.alpha_floor is not None and (
            not isinstance(self.alpha_floor, (int, float)) or not self.alpha_floor <= self.alpha_init
        ):
            raise ValueError(f"alpha_floor must be a number <= alpha_init, got {self.alpha_floor!r}")
        if self.scope_score not in ("zscore", "relative", "key"):
            raise ValueError(f"scope_score must be 'zscore', 'relative' or 'key', got {self.scope_score!r}")
        q = self.alpha_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q < 1.0:
            raise ValueError(f"alpha_quantile must be a number in [0, 1), got {q!r}")
        if self.scope_prompt_keys is True and self.scope_score != "key":
            raise ValueError("scope_prompt_keys needs scope_score='key'")
        for name in ("dynamic_alpha", "scope_rule", "scope_prompt_keys"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
