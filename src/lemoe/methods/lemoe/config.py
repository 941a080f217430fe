"""LEMoE's options. Every unknown of the paper (docs: methods.md §1) is one option here, with the
default this project measured best; ``docs/results/lemoe.md`` holds the ablations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lemoe.methods.base import MethodConfig

Activation = Literal["gelu", "relu", "silu"]


@dataclass
class LEMoEConfig(MethodConfig):
    # -- insertion -------------------------------------------------------------------------------
    layer: int | None = None  # None: ModelAccess.default_edit_layer() (layer 17 of SmolLM2's 30)
    expert_width: int = 64  # FFN width of one expert (W1: width x hidden, W2: hidden x width)
    activation: Activation = "gelu"
    scale: float = 1.0  # lambda in h = MLP(x) + lambda * sum_i g_i f_i(x)
    init_std: float | None = None  # std of W1 (None: 1/sqrt(hidden)); W2 and biases start at 0
    expert_mode: Literal["new", "shared"] = "new"  # new: one frozen expert per batch; shared: one
    #   expert trained on every batch ("joint training" ablation, forgets)
    # -- routing ---------------------------------------------------------------------------------
    routing: Literal["instance", "token"] = "instance"  # instance: one decision per sequence (KV
    #   anchor); token: every token routed on its own (conventional token-level gating, ablation)
    route_layer: int = 1  # routing reads the input of this block (0: the input embeddings, as in
    #   the paper; 1 separates paraphrases from unrelated text far better on SmolLM2, see results)
    anchor_keys: Literal["request", "centroid"] = "request"  # one key per edited prompt, or one
    #   (mean) key per expert
    null_route: bool = True  # inputs that match no anchor well enough pass through no expert
    null_quantile: float = 1.0  # threshold = this quantile of generic-vs-generic nearest scores ...
    null_margin: float = 0.0  # ... plus this margin (cosine units)
    calibration_texts: list[str] | None = None  # unrelated text for calibration (None: built-in)
    # -- training --------------------------------------------------------------------------------
    lr: float = 2e-2
    steps: int = 60  # at most, per batch
    extra_steps: int = 3  # more steps after the batch is learned (margin for generality)
    train_stop: bool = True  # also train the end-of-sequence token after the target, so greedy
    #   decoding stops after the answer (exact match); the scored target tokens are unchanged
    stop_accuracy: float = 1.0  # a batch is learned when every target token is predicted
    weight_decay: float = 0.0
    # -- order planning --------------------------------------------------------------------------
    order: Literal["cluster", "arrival"] = "cluster"
    seed: int = 0
