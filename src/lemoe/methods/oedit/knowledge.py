"""Statistics of the unedited model on generic text, for the knowledge basis B_k, and the edit loss.

``knowledge_covariance`` runs the knowledge text through the model once, in small batches, and
accumulates per edited layer a ``[D, D]`` second-moment matrix whose top eigenvectors are the
rank-q SVD of the underlying data:

- ``keys``: the vectors W_out sees (``side="in"``: its inputs, the MLP keys, at every real token)
  or produces (``side="out"``: its outputs). Protecting these keeps W_out's behaviour on generic
  text (AlphaEdit's preserved-knowledge keys).
- ``gradients``: per-text gradients of the NLL with respect to W_out (GPM's "core gradient
  space"). For a linear layer ``G_i = D_i^T X_i`` (output gradients times inputs over tokens), so
  ``sum_i G_i^T G_i`` (in) / ``sum_i G_i G_i^T`` (out) is computed from hooks, one backward per
  batch, without materialising per-text gradients.

The text (``knowledge_text``) is the packaged ROME knowns (``prompt + " " + attribute``; the NLL is
the attribute's) or a list of passages: sampled from the model by the locate core's cached sampler
(:func:`lemoe.methods.locate.stats.load_corpus`, the same passages MEMIT's ``C0`` uses at equal
sample size and length), a text file or a dataset spec. A passage has no question/answer split, so
its "continuation" is every token after the first: keys are taken at **every real token**, like the
knowns and the locate core's ``C0`` — the last token alone would give one key per passage (96 keys
for the default 96 passages, fewer than q = 128 directions) and would describe only end-of-passage
states, whereas W_out must keep working at every position of ordinary text; gradients are those of
the passage's mean token NLL. The cache key covers the model, the statistic and the exact text (the
knowns themselves, or a hash of the passages and the token limit), so different texts never share
an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lemoe import fileio
from lemoe.batching import pad_id, pad_right
from lemoe.data.knowns import KNOWNS
from lemoe.methods.locate.stats import corpus_hash, load_corpus
from lemoe.methods.oedit.config import KnowledgeSource, Side
from lemoe.methods.training import LMBatch, build_lm_batch
from lemoe.models.access import ModelAccess, projection_layout
from lemoe.models.loading import cache_dir
from lemoe.models.logits import logits_only_at


def target_positions(batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions whose logits predict target tokens ``[n, k]``, the tokens ``[n, k]`` and a mask."""
    tmask = batch.target_mask[:, 1:]  # token t+1 is a target -> logits at t predict it
    counts = tmask.sum(-1)
    k = max(int(counts.max()), 1)
    n = tmask.shape[0]
    pos = torch.zeros(n, k, dtype=torch.long, device=tmask.device)
    valid = torch.zeros(n, k, dtype=torch.bool, device=tmask.device)
    for r in range(n):
        idx = tmask[r].nonzero().flatten()
        pos[r, : len(idx)] = idx
        valid[r, : len(idx)] = True
    tokens = batch.input_ids.gather(1, pos + 1)
    return pos, tokens, valid


def target_nll(
    model: torch.nn.Module, batch: LMBatch, pos: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean NLL of the target tokens and per-sequence teacher-forced accuracy.

    The LM head runs only at the target positions: on a small model the 49k-word vocabulary
    projection dominates the cost of a training step otherwise."""
    with logits_only_at(model, pos):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    v = valid.float()
    loss = (nll * v).sum(-1) / v.sum(-1).clamp(min=1)
    with torch.no_grad():
        acc = ((logits.argmax(-1) == tokens).float() * v).sum(-1) / v.sum(-1).clamp(min=1)
    return loss, acc


def knowns_sample(n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` packaged knowns as (prompts, answers)."""
    chosen = KNOWNS[:n]
    return [p for _, p, _ in chosen], [a for _, _, a in chosen]


@dataclass(frozen=True)
class KnownsText:
    """The first ``samples`` packaged knowns."""

    samples: int

    def identity(self) -> dict[str, Any]:
        return {"knowns": KNOWNS[: self.samples]}  # the cache key of the knowns basis since it existed

    def describe(self) -> dict[str, Any]:
        return {"knowledge_text": "knowns", "texts": self.samples}


@dataclass(frozen=True)
class PassagesText:
    """Passages named by ``spec`` ("model", a text file, a data spec), cut to ``max_tokens``."""

    spec: str
    texts: tuple[str, ...]
    max_tokens: int

    @property
    def digest(self) -> str:
        return corpus_hash(self.texts, self.max_tokens)

    def identity(self) -> dict[str, Any]:
        return {"texts": self.digest}

    def describe(self) -> dict[str, Any]:
        return {"knowledge_text": self.spec, "texts": len(self.texts), "texts_sha256": self.digest}


KnowledgeText = KnownsText | PassagesText


def load_knowledge_text(
    model: torch.nn.Module,
    tokenizer: object,
    spec: str,
    samples: int,
    max_tokens: int,
    fingerprint: dict[str, Any] | None = None,
) -> KnowledgeText:
    """Resolve ``knowledge_text``: the knowns, or passages read (or, for "model", sampled once and
    cached) by the locate core. Passages shorter than two tokens carry no continuation and are
    dropped; no passage left raises ``ValueError`` before any statistics run."""
    if spec == "knowns":
        return KnownsText(samples)
    texts = load_corpus(spec, model, tokenizer, samples, max_tokens, fingerprint=fingerprint)
    kept = tuple(
        t
        for t in texts
        if len(tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]) > 1  # type: ignore[operator]
    )
    if not kept:
        raise ValueError(f"oedit: knowledge_text {spec!r} holds no passage of two or more tokens")
    return PassagesText(spec, kept, max_tokens)


def passage_batch(tokenizer: object, texts: Sequence[str], max_tokens: int) -> LMBatch:
    """Right-padded passages cut to ``max_tokens``; the first token is the "prompt", every later
    token the continuation whose NLL the gradient statistic uses."""
    enc = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]  # type: ignore[operator]
    ids, attn = pad_right(enc, pad_id(tokenizer, eos_fallback=False))
    pmask = torch.zeros_like(ids, dtype=torch.bool)
    pmask[:, 0] = True
    tmask = attn.bool() & ~pmask
    return LMBatch(ids, attn, pmask, tmask)


def knowledge_batches(tokenizer: object, text: KnowledgeText, batch_size: int = 16) -> Iterator[LMBatch]:
    """The knowledge text in batches: knowns as prompt + attribute, passages as whole texts."""
    if isinstance(text, KnownsText):
        prompts, answers = knowns_sample(text.samples)
        for i in range(0, len(prompts), batch_size):
            yield build_lm_batch(tokenizer, prompts[i : i + batch_size], answers[i : i + batch_size])
    else:
        for i in range(0, len(text.texts), batch_size):
            yield passage_batch(tokenizer, text.texts[i : i + batch_size], text.max_tokens)


def knowledge_covariance(
    access: ModelAccess,
    tokenizer: object,
    layers: Sequence[int],
    text: KnowledgeText,
    *,
    source: KnowledgeSource,
    side: Side,
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """Per layer, the ``[D, D]`` second moment of keys/values or per-text gradients (module doc)."""
    model = access.model
    device = access.device
    covs: dict[int, torch.Tensor] = {}
    for batch in knowledge_batches(tokenizer, text, batch_size):
        batch = batch.to(device)
        captured: dict[int, dict[str, Any]] = {layer: {} for layer in layers}
        handles = [_capture(access, layer, captured[layer], want_grad=source == "gradients") for layer in layers]
        try:
            if source == "gradients":
                for layer in layers:
                    access.mlp(layer).out_proj.weight.requires_grad_(True)
                pos, tokens, valid = target_positions(batch)
                with torch.enable_grad():
                    loss, _ = target_nll(model, batch, pos, tokens, valid)
                    loss.sum().backward()  # per-fact losses are independent rows: row grads are per fact
            else:
                with torch.no_grad(), logits_only_at(model, None):
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
            if source == "gradients":
                for layer in layers:
                    w = access.mlp(layer).out_proj.weight
                    w.requires_grad_(False)
                    w.grad = None
        real = batch.attention_mask.bool()
        for layer in layers:
            x = captured[layer]["in"].float()  # [n, T, in]
            y = captured[layer]["out"].float()  # [n, T, out]
            if source == "keys":
                v = (x if side == "in" else y)[real]  # [tokens, D]
                c = v.T @ v
            else:
                g = captured[layer]["grad"].float()  # [n, T, out]
                x, g = x * real[..., None], g * real[..., None]
                if side == "in":  # sum_i X_i^T (G_i G_i^T) X_i
                    m = torch.einsum("ntd,nsd->nts", g, g)
                    c = torch.einsum("nti,nts,nsj->ij", x, m, x)
                else:  # sum_i D_i^T (X_i X_i^T) D_i
                    m = torch.einsum("nti,nsi->nts", x, x)
                    c = torch.einsum("nto,nts,nsp->op", g, m, g)
            covs[layer] = covs[layer] + c if layer in covs else c
    return covs


def _capture(access: ModelAccess, layer: int, store: dict[str, Any], *, want_grad: bool) -> Any:
    """Forward hook on W_out storing its input, output and (optionally) the output's gradient."""
    module = access.mlp(layer).out_proj
    projection_layout(module)  # raises on unsupported projections

    def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        store["in"] = args[0].detach()
        store["out"] = output.detach()
        if want_grad and output.requires_grad:
            output.register_hook(lambda grad: store.__setitem__("grad", grad.detach()))

    return module.register_forward_hook(hook)


def knowledge_cache_path(fingerprint: dict[str, Any], layer: int, source: str, side: str, text: KnowledgeText) -> Path:
    """Where one layer's knowledge covariance is cached: keyed by the base model's fingerprint, the
    statistic, and the exact text used (the knowns, or a hash of the passages), so a stale file or
    another text's statistics are never picked up."""
    ident = json.dumps({"model": fingerprint, **text.identity(), "source": source, "side": side}, sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return cache_dir() / "oedit" / f"{digest}-layer{layer}.safetensors"


def cached_knowledge_covariance(
    access: ModelAccess,
    tokenizer: object,
    layers: Sequence[int],
    text: KnowledgeText,
    *,
    source: KnowledgeSource,
    side: Side,
    fingerprint: dict[str, Any],
    use_cache: bool = True,
) -> dict[int, torch.Tensor]:
    """:func:`knowledge_covariance` on ``text``, with a disk cache keyed by the base model's
    ``fingerprint`` (``EditMethod.base_fingerprint``)."""
    paths = {layer: knowledge_cache_path(fingerprint, layer, source, side, text) for layer in layers}
    covs: dict[int, torch.Tensor] = {}
    if use_cache:
        for layer, path in paths.items():
            # missing or unreadable: recomputed below
            with contextlib.suppress(Exception):  # safetensors raises several error types
                covs[layer] = load_file(str(path))["cov"]
    missing = [layer for layer in layers if layer not in covs]
    if missing:
        fresh = knowledge_covariance(access, tokenizer, missing, text, source=source, side=side)
        for layer, cov in fresh.items():
            covs[layer] = cov.cpu()
            if use_cache:
                with fileio.atomic_path(paths[layer]) as tmp:
                    save_file({"cov": covs[layer].contiguous()}, str(tmp))
    return covs
