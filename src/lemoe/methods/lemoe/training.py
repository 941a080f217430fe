"""Training one new expert on one edit batch, with the base model and every earlier expert frozen.

:func:`training_parts` turns a batch of edits into tokenised training rows (the wordings of
:mod:`.wording`), the positions the expert acts at, and the parts of :mod:`.parts` that share a
frozen prefix. :func:`fit_expert` runs AdamW on the targets' NLL (plus the KL to the base model on
preservation rows) and stops early once every edit's target is learned. Frozen work is done once
per batch, not once per step: the blocks below the edited layer (:func:`prepare_part`) and a
part's shared prefix at every layer (its KV cache). The LM head runs only at target positions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lemoe.methods.lemoe import parts, wording
from lemoe.methods.lemoe.config import LEMoEConfig
from lemoe.methods.lemoe.experts import Expert
from lemoe.methods.lemoe.generic import GENERIC_PROMPTS
from lemoe.methods.training import build_lm_batch
from lemoe.models.access import ModelAccess
from lemoe.models.frozen import hidden_before_block, skip_frozen_blocks
from lemoe.models.kv_cache import cache_keyword, returned_cache
from lemoe.requests import EditRequest


def context_sentence(batch: int, item: int, k: int) -> str:
    """A deterministic unrelated sentence to put before an edit prompt (``train_prefixes``)."""
    return GENERIC_PROMPTS[(batch * 7 + item * 3 + k * 11) % len(GENERIC_PROMPTS)]


def training_parts(
    tokenizer: object,
    requests: Sequence[EditRequest],
    cfg: LEMoEConfig,
    chat: tuple[str, str] | None,
    batch_index: int,
    device: torch.device,
) -> tuple[list[parts.Part], torch.Tensor]:
    """The batch's training rows as parts, and which rows are preservation rows (``[n]``)."""
    eos = getattr(tokenizer, "eos_token", None) if cfg.train_stop else None
    prefixes = [
        (lambda i, k=k: context_sentence(batch_index, i, k)) for k in range(cfg.train_prefixes)
    ]  # the same edits behind unrelated context
    rows = wording.training_rows(requests, eos or "", chat, prefixes, cfg.preserve_relations)
    # A preservation row has no target; it is scored at its last prompt position only.
    batch = build_lm_batch(tokenizer, [r.text for r in rows], [r.target or "x" for r in rows])
    preserve = torch.tensor([r.preserve for r in rows])
    batch.target_mask[preserve] = False
    batch = batch.to(device)
    positions = "subject" if cfg.gate == "clause" and cfg.expert_positions == "subject" else "run"
    width = batch.input_ids.shape[1]
    mask = wording.expert_mask(tokenizer, rows, width, positions)
    mask |= (batch.target_mask & (positions == "run")).cpu()  # run: the answer continues the clause
    in_chat = torch.tensor(
        [bool(chat and chat[0]) and r.prompt_start == len(chat[0]) and r.text.startswith(chat[0]) for r in rows]
    )
    mask = mask.to(device)
    if cfg.share_prefix:  # the chat rows' template prefix runs once per batch, not once per step
        split = parts.split_shared_prefix(batch, mask, in_chat)
    else:
        split = [parts.Part(torch.arange(len(rows), device=mask.device), batch, mask)]
    return split, preserve.to(device)


def prefix_forward(model: nn.Module, part: parts.Part) -> dict[str, Any]:
    """Forward arguments that put a part's rows behind its shared prefix: a fresh copy of the
    prefix's KV cache for every row, and an attention mask covering prefix and suffix."""
    if part.start == 0:
        return {"attention_mask": part.batch.attention_mask, "use_cache": False}
    n = part.rows.shape[0]
    cache = copy.deepcopy(part.prefix_cache)
    cache.batch_repeat_interleave(n)
    ones = torch.ones(n, part.start, dtype=part.batch.attention_mask.dtype, device=part.rows.device)
    return {
        "attention_mask": torch.cat([ones, part.batch.attention_mask], 1),
        cache_keyword(model): cache,
        "use_cache": True,
    }


def prepare_part(model: nn.Module, access: ModelAccess, layer: int, part: parts.Part) -> None:
    """The prefix's KV cache (once) and the edited block's input for the part's rows (once)."""
    if part.start:
        assert part.prefix_ids is not None
        part.prefix_cache = returned_cache(model(input_ids=part.prefix_ids, use_cache=True))
    kwargs = prefix_forward(model, part)
    attn = kwargs.pop("attention_mask")
    part.hidden, part.tuple_out = hidden_before_block(access, layer, part.batch.input_ids, attn, **kwargs)


def part_logits(model: nn.Module, access: ModelAccess, layer: int, part: parts.Part, pos: torch.Tensor) -> torch.Tensor:
    """Logits at the positions that predict target tokens only (the LM head over a 49k
    vocabulary on every position would cost more than the blocks above the edited layer)."""
    assert part.hidden is not None
    base = model.base_model
    kwargs = prefix_forward(model, part)
    if part.start:  # the base model takes the cache under its own keyword
        kwargs[cache_keyword(base)] = kwargs.pop(cache_keyword(model))
    with skip_frozen_blocks(access, layer, part.hidden, part.tuple_out):
        out = base(input_ids=part.batch.input_ids, **kwargs)
    h = out[0][:, :-1][pos]
    logits = model.get_output_embeddings()(h)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def fit_expert(
    expert: Expert,
    training: list[parts.Part],
    preserve: torch.Tensor,
    cfg: LEMoEConfig,
    *,
    logits_of: Callable[[parts.Part, torch.Tensor], torch.Tensor],
    frozen: Callable[[], AbstractContextManager[None]],
    training_mode: Callable[[], AbstractContextManager[None]],
    prepare: Callable[[parts.Part], None],
) -> tuple[int, float, float]:
    """Train ``expert``; returns (steps, last loss, the worst edit's target accuracy).

    ``frozen()`` runs the model with no expert at all and ``training_mode()`` with only this expert
    (the method's hooks decide how); ``logits_of(part, positions)`` runs a part from its frozen
    states; ``prepare(part)`` computes them once, under ``frozen()``."""
    with frozen():
        for part in training:
            prepare(part)
    opt = torch.optim.AdamW(expert.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps, loss_value, acc, extra_left = 0, float("nan"), 0.0, cfg.extra_steps
    # Per part: positions predicting targets (pos) and, on preservation rows, the position after
    # the prompt (keep); flattened over parts in order, with each position's row in the batch.
    sel, is_target, labels, row_of = [], [], [], []
    for part in training:
        pos = part.batch.target_mask[:, 1:]
        keep = torch.zeros_like(pos)
        kept = preserve[part.rows]
        last = part.batch.prompt_mask.sum(1) - 1
        keep[kept, last[kept]] = True
        sel.append(pos | keep)
        is_target.append(pos[pos | keep])
        labels.append(part.batch.input_ids[:, 1:][pos])
        row_of.append(part.rows[:, None].expand_as(pos)[pos])
    is_target_all = torch.cat(is_target)
    labels_all, rows = torch.cat(labels), torch.cat(row_of)
    counts = torch.zeros(preserve.shape[0], device=rows.device)
    counts = counts.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32)).clamp(min=1.0)
    edit_rows = ~preserve

    def logits() -> torch.Tensor:
        return torch.cat([logits_of(part, s) for part, s in zip(training, sel, strict=True)])

    base_logp = None
    if bool((~is_target_all).any()):
        with frozen(), torch.no_grad():
            base_logp = F.log_softmax(logits()[~is_target_all].float(), -1)
    with training_mode():
        for _ in range(cfg.steps):
            out = logits()
            target_logits, keep_logits = out[is_target_all], out[~is_target_all]
            with torch.no_grad():
                right = (target_logits.argmax(-1) == labels_all).float()
                per_seq = torch.zeros_like(counts).index_add_(0, rows, right) / counts
                acc = float(per_seq[edit_rows].min())
            if acc >= cfg.stop_accuracy:
                if extra_left <= 0:
                    break
                extra_left -= 1
            nll = F.cross_entropy(target_logits.float(), labels_all, reduction="none")
            loss = (torch.zeros_like(counts).index_add(0, rows, nll) / counts)[edit_rows].mean()
            if base_logp is not None:
                logp = F.log_softmax(keep_logits.float(), -1)
                kl = F.kl_div(logp, base_logp, log_target=True, reduction="batchmean")
                loss = loss + cfg.preserve_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            loss_value = float(loss.detach())
    expert.requires_grad_(False)
    return steps, loss_value, acc
