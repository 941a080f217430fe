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
    expert_dtype: Literal["model", "float32", "bfloat16", "float16"] = "model"  # storage of frozen
    #   experts: the model's dtype, or a narrower one (half the memory; each routed expert is cast
    #   to the model's dtype when it runs; accuracy cost in docs/results/lemoe.md)
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
    gate: Literal["clause", "sequence"] = "clause"  # route_key=subject: clause: every clause of the
    #   prompt (split at sentence ends, newlines and special tokens) is routed on the subjects it
    #   holds and each position uses its clause's expert, so an edited subject mentioned earlier in a
    #   text leaves a later question alone and two edited facts in one text each get their expert;
    #   sequence: one decision for the whole sequence (the subject anywhere captures everything)
    expert_positions: Literal["run", "subject"] = "subject"  # gate=clause: run: the expert acts at
    #   every position of the question's clauses; subject: only at the matched subject's tokens
    #   (the rest of the text reads the edited subject through attention, as for a ROME edit)
    clause_min_tokens: int = 3  # gate=clause: a clause with fewer content tokens than this and no
    #   edited subject ("Answer:", a chat template's assistant header) continues the clause before
    anchor_keys: Literal["request", "centroid"] = "request"  # route_key=prompt: one key per edited
    #   prompt, or one (mean) key per expert
    null_route: bool = True  # inputs that match no anchor well enough pass through no expert
    null_quantile: float = 1.0  # route_key=prompt: threshold = this quantile of generic-vs-generic
    #   nearest scores ...
    null_margin: float | None = None  # ... plus this margin (cosine units). None: 0.3 for
    #   route_key=subject (added to each key's own calibrated threshold), 0.0 for route_key=prompt
    route_index: Literal["auto", "exact", "hnsw"] = "auto"  # route_key=subject: exact scores every
    #   key; hnsw scores only the keys a faiss HNSW index over the key slots finds near some prompt
    #   token, once there are route_index_min_slots slots (needs the `index` extra; measured in
    #   docs/results/lemoe.md); auto: hnsw when faiss is installed, else exact
    route_index_min_slots: int = 20000
    route_index_neighbours: int = 32  # neighbours retrieved per prompt token
    calibration_texts: list[str] | None = None  # unrelated text for calibration (None: built-in
    #   generic prompts, plus the packaged ROME "knowns" facts for route_key=subject)
    # -- training --------------------------------------------------------------------------------
    lr: float = 2e-2
    steps: int = 60  # at most, per batch
    extra_steps: int = 3  # more steps after the batch is learned (margin for generality)
    train_stop: bool = True  # also train the end-of-sequence token after the target, so greedy
    #   decoding stops after the answer (exact match); the scored target tokens are unchanged
    train_chat: bool = True  # also train each edit asked as a chat user message (through the
    #   tokenizer's chat template, when it has one), so an Instruct model answers it in a chat
    chat_system: str | None = None  # train_chat: the system message of the chat wording. None: the
    #   template's default system prompt (what a plain chat request gets; with share_prefix its
    #   tokens cost nothing per step); "": an empty one (the other contexts answer worse: another
    #   edit of the same batch is said, see docs/results/realistic.md)
    share_prefix: bool = True  # train_chat: run the chat rows' common template prefix (system prompt,
    #   user header) once per batch and train on their suffixes against its KV cache; same result
    #   (up to float rounding), a fraction of the cost of rows with a long system prompt
    context_keys: bool = True  # route_key=subject: also key each subject as read inside the chat
    #   template and behind a generic sentence (mid-text states, where paraphrases put subjects)
    train_prefixes: int = 0  # also train each edit behind this many unrelated generic sentences
    #   (paraphrases often add context before the subject); 0 = the bare prompt only
    preserve_relations: int = 0  # also train, per edit, this many other relations of the same
    #   subject (wording.PRESERVE_TEMPLATES, not the evaluation's templates) to keep the base
    #   model's next-token distribution (KL), so the subject alone does not carry the edit
    preserve_weight: float = 1.0  # weight of that KL term against the target NLL
    stop_accuracy: float = 1.0  # a batch is learned when every target token is predicted
    weight_decay: float = 0.0
    # -- order planning --------------------------------------------------------------------------
    order: Literal["cluster", "arrival"] = "cluster"
    seed: int = 0
