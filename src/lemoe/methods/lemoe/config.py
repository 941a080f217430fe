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
    route_key: Literal["subject", "prompt"] = "subject"  # subject: a key is the token span of the
    #   edit's subject, matched anywhere in a prompt, with its own calibrated threshold; prompt: a
    #   key is the mean-pooled prompt (the paper's instance embedding), one global threshold
    route_layer: int | None = None  # routing reads the input of this block (0: the input embeddings,
    #   as in the paper). None: 4 for route_key=subject, 1 for route_key=prompt (measured best)
    route_prefix: bool = False  # route_key=subject: compute routing vectors in a separate pass
    #   with a separator token (EOS, else BOS) before the prompt, so a subject at the very start
    #   does not sit on the model's first position. Measured: no gain (ZsRE 0.988 vs 0.994
    #   paraphrases routed home, CounterFact 0.731 vs 0.724), and the extra pass costs prefill time
    anchor_keys: Literal["request", "centroid"] = "request"  # route_key=prompt: one key per edited
    #   prompt, or one (mean) key per expert
    null_route: bool = True  # inputs that match no anchor well enough pass through no expert
    null_quantile: float = 1.0  # route_key=prompt: threshold = this quantile of generic-vs-generic
    #   nearest scores ...
    null_margin: float | None = None  # ... plus this margin (cosine units). None: 0.3 for
    #   route_key=subject (added to each key's own calibrated threshold), 0.0 for route_key=prompt
    calibration_texts: list[str] | None = None  # unrelated text for calibration (None: built-in
    #   generic prompts, plus the packaged ROME "knowns" facts for route_key=subject)
    # -- training --------------------------------------------------------------------------------
    lr: float = 2e-2
    steps: int = 60  # at most, per batch
    extra_steps: int = 3  # more steps after the batch is learned (margin for generality)
    train_stop: bool = True  # also train the end-of-sequence token after the target, so greedy
    #   decoding stops after the answer (exact match); the scored target tokens are unchanged
    train_prefixes: int = 0  # also train each edit behind this many unrelated generic sentences
    #   (paraphrases often add context before the subject); 0 = the bare prompt only
    stop_accuracy: float = 1.0  # a batch is learned when every target token is predicted
    weight_decay: float = 0.0
    # -- order planning --------------------------------------------------------------------------
    order: Literal["cluster", "arrival"] = "cluster"
    seed: int = 0
