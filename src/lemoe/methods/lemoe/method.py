"""LEMoE: lifelong editing with a mixture-of-experts adaptor beside one MLP.

``h = MLP(x) + λ · f_e(x)`` at the edited layer, where ``e`` is the expert a KV-anchor router picks,
or nothing at all (the null route). One new FFN expert per edit batch, trained with the base model
and every earlier expert frozen. With ``gate=clause`` (default, :mod:`.segments`) the router reads
the prompt clause by clause and only the clause that asks the question being answered gets an
expert, at its matched subject's tokens (``expert_positions=subject``), so an edited subject named
earlier in a text leaves a later question alone; ``gate=sequence`` is the original one decision per
sequence. Each edit is trained in several wordings (:mod:`.wording`): the bare prompt, the prompt as
a chat user message, optionally behind generic sentences and with preservation rows.

Insertion uses hooks only (base weights are never touched; removing the hooks restores the model
exactly):

- a forward pre-hook on the model sees ``input_ids``/``attention_mask``/``past_key_values`` and
  decides which tokens are pooled (the prompt, when the evaluator says so through
  :meth:`forward_context`; otherwise every real token) and whether this is KV-cached decoding;
- a forward pre-hook on block ``route_layer`` routes once per sequence at prefill; decoding steps
  keep that decision (also under HF ``generate``). With ``route_key=subject`` (default) it slides
  subject-span keys over that block's input at the prompt tokens; with ``route_key=prompt`` it pools
  that input over the prompt tokens. (With ``route_prefix=true`` the model pre-hook instead runs the
  blocks below ``route_layer`` once more on the prompt behind a separator token and routes on that.);
- a forward pre-hook on the MLP's input projection captures ``x``; a forward hook on its output
  projection adds the chosen experts' output, gathered per sequence in one batched matmul.

Layout: this class is the injection (hooks and the per-forward runtime) and composes the parts
along their seams: :class:`~.state.Edits` (experts, keys, which batch each expert holds),
:class:`~.routing.Router` (the key table and its decisions), :class:`~.calibration.Calibration`
(generic-text statistics and thresholds) and :mod:`.training` (building rows, fitting an expert).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lemoe.batching import pad_id, pad_right
from lemoe.data.knowns import KNOWNS
from lemoe.methods.base import EditMethod, RollbackNotSupported
from lemoe.methods.lemoe import parts, router, segments, training, wording
from lemoe.methods.lemoe.calibration import Calibration, TokenBatch
from lemoe.methods.lemoe.config import LEMoEConfig
from lemoe.methods.lemoe.experts import ACTIVATIONS, Expert, ExpertBank, apply_per_sequence, apply_per_token
from lemoe.methods.lemoe.generic import GENERIC_PROMPTS
from lemoe.methods.lemoe.planning import plan_clustered
from lemoe.methods.lemoe.routing import Router
from lemoe.methods.lemoe.state import Edits
from lemoe.models.access import weight_as_out_in
from lemoe.models.kv_cache import passed_cache
from lemoe.requests import EditRequest


class _Stop(Exception):
    """Ends an observation forward pass once the routing input has been captured."""


@dataclass
class _Runtime:
    """Per-forward routing state (never saved)."""

    mode: str = "route"  # route | train | observe | off
    prompt_mask: torch.Tensor | None = None  # set by forward_context
    active: bool = False  # inside a top-level model forward
    decoding: bool = False  # this forward continues a KV cache
    batch: int = 0
    pool_mask: torch.Tensor | None = None
    choice: torch.Tensor | None = None  # [B] (instance) or [B, T] (token, clause); -1: null route
    tail: torch.Tensor | None = None  # [B] gate=clause: the expert of each prompt's last clause,
    #   which KV-cached decoding steps keep
    ids: torch.Tensor | None = None  # the input ids of the current forward (clause gating)
    train_mask: torch.Tensor | None = None  # [B, T] positions the expert being trained acts on
    x: torch.Tensor | None = None  # the MLP input of the current forward
    train_expert: Expert | None = None
    observed: torch.Tensor | None = None
    record: list[torch.Tensor] | None = None  # prefill decisions, when recording


def _is_decoding(past: Any) -> bool:
    if past is None:
        return False
    get_len = getattr(past, "get_seq_length", None)
    if callable(get_len):
        return int(get_len()) > 0
    try:
        return len(past) > 0 and past[0][0].shape[-2] > 0
    except (TypeError, IndexError, AttributeError):
        return False


class LEMoE(EditMethod):
    name = "lemoe"
    config_class = LEMoEConfig
    supports_rollback = True
    state_copy_on_write = True  # every change binds new tensors (torch.cat, index_select, clone)
    edits_base_weights = False  # hooks beside the MLP; the base weights are never written

    def __init__(self, model: nn.Module, tokenizer: object, config: LEMoEConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        cfg = self.cfg
        self.layer = cfg.layer if cfg.layer is not None else self.access.default_edit_layer()
        subject = cfg.route_key == "subject"
        self.route_layer = cfg.route_layer if cfg.route_layer is not None else (4 if subject else 1)
        self.route_layer = min(self.route_layer, self.layer)
        self.null_margin = cfg.null_margin if cfg.null_margin is not None else (0.3 if subject else 0.0)
        _validate(cfg, self.layer, self.access.num_layers, self.route_layer, self.null_margin)
        self.parts = self.access.mlp(self.layer)
        self.d_in = weight_as_out_in(self.parts.input_module).shape[1]
        self.d_out = self.parts.hidden_size
        self.act = ACTIVATIONS[cfg.activation]
        self.init_std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(self.d_in)
        self._rt = _Runtime()
        self._rt_static: dict[str, Any] = {}  # derived from the tokenizer only (clause flags)
        self.calibration = Calibration()  # the base model's, saved with the state
        self._clear_edits()
        self._handles: list[Any] = []
        self._install_hooks()

    @property
    def cfg(self) -> LEMoEConfig:
        return self.config  # type: ignore[return-value]

    def _install_hooks(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True),
            self.model.register_forward_hook(self._on_model_done, always_call=True),
            self.access.blocks[self.route_layer].register_forward_pre_hook(self._on_route_input, with_kwargs=True),
            self.parts.input_module.register_forward_pre_hook(self._on_mlp_input),
            self.parts.out_proj.register_forward_hook(self._on_mlp_output),
        ]

    def remove_hooks(self) -> None:
        """Detach LEMoE from the model (the base model's behaviour is then exactly restored)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The bare base model inside the block (hooks detached), LEMoE again after it."""
        self.remove_hooks()
        try:
            yield
        finally:
            self._install_hooks()

    # -- state -----------------------------------------------------------------------------------
    @property
    def expert_dtype(self) -> torch.dtype:
        """How frozen experts are stored (``expert_dtype``; training is always float32)."""
        name = self.cfg.expert_dtype
        return self.access.dtype if name == "model" else getattr(torch, name)

    @property
    def bank(self) -> ExpertBank:
        return self.edits.bank

    @property
    def router(self) -> Router:
        return self.edits.router

    @property
    def n_experts(self) -> int:
        return len(self.edits)

    def _clear_edits(self) -> None:
        self._state_epoch = getattr(self, "_state_epoch", 0) + 1  # see append_only_state
        dev, dt = self.access.device, self.expert_dtype
        self.edits = Edits.empty(self.d_in, self.d_out, self.cfg.expert_width, self.access.hidden_size, dt, dev)
        self._configure_router()

    def _configure_router(self) -> None:
        cfg = self.cfg
        hnsw = cfg.route_key == "subject" and (
            cfg.route_index == "hnsw" or (cfg.route_index == "auto" and importlib.util.find_spec("faiss") is not None)
        )
        self.router.index_min_slots = cfg.route_index_min_slots if hnsw else None
        self.router.index_neighbours = cfg.route_index_neighbours

    def reset(self) -> None:
        self._clear_edits()
        self.batches_applied = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._ensure_calibrated()
        return {**self.edits.tensors(), **self.calibration.tensors()}

    def append_only_state(self) -> dict[str, int]:
        """Experts (one per batch), router keys and their slots, and the per-expert lists only grow
        by appending until a reset, load or rollback (each bumps the epoch)."""
        return dict.fromkeys(Edits.append_only_keys(self.cfg.expert_mode == "shared"), self._state_epoch)

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), **self.edits.meta(), "route_key": self.cfg.route_key}

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        dims = (self.d_in, self.d_out, self.cfg.expert_width, self.access.hidden_size)
        edits = Edits.from_state(
            state,
            meta,
            dims=dims,
            subject=self.cfg.route_key == "subject",
            dtype=self.expert_dtype,
            device=self.access.device,
        )
        self._state_epoch += 1
        old, self.edits = self.edits.router, edits
        self._configure_router()
        self.router.keep_index_of(old)  # a replica's publish of an appended state grows the index
        self.calibration.load(state, self.access.device)
        self.batches_applied = int(meta.get("batches_applied", len(edits)))

    def rollback(self, batch_index: int) -> None:
        """Remove the expert trained on batch ``batch_index``; every other expert is untouched."""
        if self.cfg.expert_mode == "shared":
            raise RollbackNotSupported("expert_mode=shared mixes every batch into one expert")
        self.edits.remove_batch(batch_index)
        self._state_epoch += 1

    def parameters_per_expert(self) -> int:
        w = self.cfg.expert_width
        return w * self.d_in + w + self.d_out * w + self.d_out

    # -- hooks -----------------------------------------------------------------------------------
    @contextmanager
    def forward_context(self, prompt_mask: torch.Tensor) -> Iterator[None]:
        """Tell the router which tokens are the prompt for the forwards inside the block."""
        previous = self._rt.prompt_mask
        self._rt.prompt_mask = prompt_mask
        try:
            yield
        finally:
            self._rt.prompt_mask = previous

    def _on_model_forward(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rt, cfg = self._rt, self.cfg
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        rt.active = True
        if ref is None:
            rt.decoding, rt.pool_mask, rt.choice = False, None, None
            return
        b, t = ref.shape[:2]
        rt.batch = b
        keep = (
            cfg.routing == "instance"
            and _is_decoding(passed_cache(kwargs))
            and rt.choice is not None
            and rt.choice.shape[0] == b
        )
        rt.decoding = keep
        if keep:
            if rt.tail is not None and rt.tail.shape[0] == b:
                rt.choice = rt.tail  # clause gating: new tokens continue the prompt's last clause
            return  # one decision per sequence: keep the one made at prefill
        attn = kwargs.get("attention_mask")
        mask = attn.bool() if isinstance(attn, torch.Tensor) and attn.shape == (b, t) else None
        mask = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=ref.device)
        pm = rt.prompt_mask
        if pm is not None and pm.shape == (b, t):
            prompt = mask & pm.to(mask.device).bool()
            mask = torch.where(prompt.any(1, keepdim=True), prompt, mask)
        rt.pool_mask = mask
        rt.choice, rt.tail, rt.ids = None, None, ids
        if cfg.route_key == "subject" and cfg.route_prefix and rt.mode == "route" and self.n_experts > 0:
            if ids is None:
                return  # inputs_embeds only: no token ids to route on, so no expert
            self._ensure_calibrated()
            self._decide(self._route_ids(ids, attn_mask_or_ones(attn, b, t, ids.device), mask))

    def _on_model_done(self, *_: Any) -> None:
        self._rt.active = False
        self._rt.x = None

    def _on_route_input(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rt, cfg = self._rt, self.cfg
        if not rt.active or rt.mode not in ("route", "observe") or rt.decoding:
            return
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if h.dim() == 2:  # flattened [B*T, d]
            h = h.view(rt.batch, -1, h.shape[-1])
        if rt.mode == "observe":
            rt.observed = h.detach()
            raise _Stop
        if cfg.route_key == "subject" and cfg.route_prefix:
            return  # routed in the model pre-hook (its own pass behind the separator)
        if self.n_experts == 0:
            rt.choice = None
            return
        self._ensure_calibrated()
        mask = rt.pool_mask if rt.pool_mask is not None and rt.pool_mask.shape == h.shape[:2] else None
        if cfg.route_key == "subject":
            valid = mask if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            q = self.calibration.tokens(h)
            if cfg.gate == "clause" and rt.ids is not None and rt.ids.shape == h.shape[:2]:
                gate = self._route_clauses(q, valid, rt.ids)
                if cfg.expert_positions == "subject":  # decoding reads the edited subject from the cache
                    self._decide(gate.max(1).values)
                    rt.tail = torch.full_like(gate[:, 0], router.NULL)
                else:
                    rt.tail = gate.gather(1, segments.last_valid(valid)[:, None]).squeeze(1)
                    self._decide(rt.tail)
                rt.choice = gate
            else:
                self._decide(self.router.route_spans(q, valid, cfg.null_route))
        elif cfg.routing == "token":
            threshold = self.calibration.token_threshold if cfg.null_route else None
            rt.choice = self.router.route_queries(self.calibration.tokens(h), threshold)
        else:
            mask = mask if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            self._decide(self._route_pooled(self.calibration.pooled(h, mask)))

    def _decide(self, choice: torch.Tensor) -> None:
        """Keep one per-sequence routing decision for this forward (and record it when asked)."""
        self._rt.choice = choice
        if self._rt.record is not None:
            self._rt.record.append(choice.detach().cpu().clone())

    def _on_mlp_input(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._rt.mode in ("route", "train"):
            self._rt.x = args[0]

    def _on_mlp_output(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
        rt = self._rt
        x, rt.x = rt.x, None
        if x is None:
            return None
        scale = self.cfg.scale
        if rt.mode == "train" and rt.train_expert is not None:
            delta = rt.train_expert(x.float(), self.act).to(output.dtype)
            mask = rt.train_mask
            if mask is not None and delta.dim() == 3 and mask.shape == delta.shape[:2]:
                delta = delta * mask.unsqueeze(-1).to(delta.dtype)
            return output + scale * delta
        if rt.mode != "route" or not rt.active or rt.choice is None or self.n_experts == 0:
            return None
        x3 = x.view(rt.batch, -1, x.shape[-1]) if x.dim() == 2 else x
        choice = rt.choice
        if choice.dim() == 2 and choice.shape[1] != x3.shape[1]:
            return None
        if choice.dim() == 2:  # token-level gating, or one expert per clause
            delta = apply_per_token(self.bank, x3, choice, self.act)
        else:
            delta = apply_per_sequence(self.bank, x3, choice, self.act)
        if delta is None:
            return None
        return output + scale * delta.reshape(output.shape)

    @contextmanager
    def record_decisions(self) -> Iterator[list[torch.Tensor]]:
        """Collect the per-sequence decision of every prefill/full forward inside the block."""
        self._rt.record = []
        try:
            yield self._rt.record
        finally:
            self._rt.record = None

    @contextmanager
    def _mode(self, mode: str, expert: Expert | None = None) -> Iterator[None]:
        old = (self._rt.mode, self._rt.train_expert)
        self._rt.mode, self._rt.train_expert = mode, expert
        try:
            yield
        finally:
            self._rt.mode, self._rt.train_expert = old
            self._rt.x = None

    # -- routing inputs --------------------------------------------------------------------------
    def _route_pooled(self, q: torch.Tensor) -> torch.Tensor:
        return self.router.route_queries(q, self.calibration.threshold if self.cfg.null_route else None)

    def _route_clauses(self, q: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return self.router.route_clauses(
            q,
            valid,
            ids,
            self._token_classes(),
            null_route=cfg.null_route,
            min_tokens=cfg.clause_min_tokens,
            positions=cfg.expert_positions,
        )

    def _prefix_id(self) -> int | None:
        """The separator put before every routed text (route_key=subject), or None."""
        if self.cfg.route_key != "subject" or not self.cfg.route_prefix:
            return None
        for name in ("eos_token_id", "bos_token_id"):
            tid = getattr(self.tokenizer, name, None)
            if isinstance(tid, int):
                return tid
        return pad_id(self.tokenizer)

    @torch.no_grad()
    def _observe_rows(self, rows: Sequence[Sequence[int]], batch_size: int = 32) -> list[torch.Tensor]:
        """The routing layer's input (``[T_i, d]``, float32) for each token-id row, behind the
        separator when there is one. Runs with its own runtime, so it may be called from inside a
        forward (the routing pass of ``route_key=subject``) without disturbing that forward."""
        prefix = self._prefix_id()
        lead = [] if prefix is None else [prefix]
        out: list[torch.Tensor] = []
        for i in range(0, len(rows), batch_size):
            chunk = [lead + list(r) for r in rows[i : i + batch_size]]
            ids, mask = pad_right(chunk, pad_id(self.tokenizer, eos_fallback=False), self.access.device)
            outer, self._rt = self._rt, _Runtime(mode="observe")
            try:
                with suppress(_Stop):
                    self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                h = self._rt.observed
            finally:
                self._rt = outer
            if h is None:
                raise RuntimeError("LEMoE's hooks are not installed (remove_hooks() was called)")
            out.extend(h[r, len(lead) : len(s)].float() for r, s in enumerate(chunk))
        return out

    def _route_hidden(self, texts: Sequence[str], batch_size: int = 32) -> list[torch.Tensor]:
        """The routing layer's input for each text (``[T_i, d]``), as the router sees it."""
        enc = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]  # type: ignore[operator]
        return self._observe_rows(enc, batch_size)

    def _route_ids(self, ids: torch.Tensor, attn: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """route_key=subject: the expert of each sequence (``[B]``, ``NULL`` for none). The real
        tokens of each row are packed behind the separator (left or right padding alike)."""
        real = attn.bool()
        rows = [ids[b][real[b]].tolist() for b in range(ids.shape[0])]
        flags = [pool[b][real[b]] for b in range(ids.shape[0])]
        if any(len(r) == 0 for r in rows):
            rows = [r or [pad_id(self.tokenizer)] for r in rows]
            flags = [f if f.numel() else torch.zeros(1, dtype=torch.bool) for f in flags]
        q, valid = self.calibration.token_batch(self._observe_rows(rows), flags)
        return self.router.route_spans(q, valid, self.cfg.null_route).to(ids.device)

    def _token_classes(self) -> segments.TokenClasses:
        """Per-token clause flags of this tokenizer (built once, kept on the model's device)."""
        classes = self._rt_static.get("classes")
        if classes is None:
            vocab = int(self.model.get_input_embeddings().weight.shape[0])  # type: ignore[union-attr]
            classes = segments.token_classes(self.tokenizer, vocab).to(self.access.device)
            self._rt_static["classes"] = classes
        return classes

    def _chat_wrap(self, system: str | None = None) -> tuple[str, str] | None:
        """The tokenizer's chat template around a user message (computed once per system)."""
        cache_key = f"chat_wrap:{system!r}"
        if cache_key not in self._rt_static:
            self._rt_static[cache_key] = wording.chat_wrap(self.tokenizer, system)
        return self._rt_static[cache_key]

    # -- calibration -----------------------------------------------------------------------------
    def _calibration_texts(self) -> list[str]:
        if self.cfg.calibration_texts is not None:
            return list(self.cfg.calibration_texts)
        knowns = [prompt for _, prompt, _ in KNOWNS] if self.cfg.route_key == "subject" else []
        return list(GENERIC_PROMPTS) + knowns

    def _ensure_calibrated(self) -> None:
        """Standardisation statistics and the null threshold, from calibration text only (once)."""
        cfg, cal = self.cfg, self.calibration
        hidden = None
        if not cal.ready:
            hidden = self._route_hidden(self._calibration_texts())
            cal.fit(hidden, cfg.null_quantile, self.null_margin, keep_tokens=cfg.route_key == "subject")
        if cfg.routing == "token" and cal.token_threshold is None:
            hidden = hidden if hidden is not None else self._route_hidden(self._calibration_texts())
            cal.fit_token_threshold(hidden, cfg.null_quantile, self.null_margin)

    def _calibration_tokens(self) -> TokenBatch:
        """Token vectors of the calibration text (route_key=subject; recomputed after a load)."""
        self._ensure_calibrated()
        cal = self.calibration
        if cal.token_vectors is None:
            cal.token_vectors = cal.token_batch(self._route_hidden(self._calibration_texts()), None)
        return cal.token_vectors

    # -- keys ------------------------------------------------------------------------------------
    def _subject_keys(self, requests: Sequence[EditRequest], wrap: tuple[str, str] = ("", "")) -> list[torch.Tensor]:
        """The unit token vectors of each request's subject span in its prompt (the whole prompt
        when a request has no subject or the tokenizer gives no character offsets), with the
        prompt placed between ``wrap = (before, after)`` texts."""
        before, after = wrap
        prompts = [before + r.prompt + after for r in requests]
        try:
            enc = self.tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=True)  # type: ignore[operator]
            offsets = enc["offset_mapping"]
        except (NotImplementedError, TypeError, KeyError, ValueError):
            enc = self.tokenizer(prompts, add_special_tokens=True)  # type: ignore[operator]
            offsets = None
            warnings.warn("tokenizer gives no character offsets: LEMoE keys on whole prompts", stacklevel=3)
        hidden = self._observe_rows(enc["input_ids"])
        spans = []
        for i, (r, h) in enumerate(zip(requests, hidden, strict=True)):
            idx: list[int] = []
            if r.subject and offsets is not None:
                start = len(before) + r.prompt.index(r.subject)
                idx = router.span_from_offsets(list(offsets[i]), start, start + len(r.subject))
            spans.append(self.calibration.tokens(h[idx] if idx else h))
        return spans

    def _key_wraps(self) -> list[tuple[str, str]]:
        """The contexts each subject key is read in: the bare prompt, and with ``context_keys``
        the prompt inside the chat template and behind a generic sentence. A subject at the start
        of a bare prompt sits on the model's first position, whose states differ from the same
        words mid-text (where paraphrases and chat questions put it)."""
        wraps = [("", "")]
        if self.cfg.context_keys:
            chat = self._chat_wrap()
            if chat is not None:
                wraps.append(chat)
            wraps.append((GENERIC_PROMPTS[0] + " ", ""))
        return wraps

    def _add_subject_keys(self, requests: Sequence[EditRequest], index: int) -> None:
        """Append the keys of a batch (all routed to expert ``index``) with their thresholds."""
        spans = [span for wrap in self._key_wraps() for span in self._subject_keys(requests, wrap)]
        self.router.add_subject_keys(spans, index, self._calibration_tokens(), self.null_margin)

    def routing_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit routing embeddings ``[n, d]`` of prompts (what the router compares with keys)."""
        self._ensure_calibrated()
        return self.calibration.pool(self._route_hidden(prompts))

    def route_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The expert each prompt is routed to (``-1``: none), computed as at inference."""
        cfg = self.cfg
        if self.router.size == 0:
            return torch.full((len(prompts),), router.NULL, dtype=torch.long)
        if cfg.route_key != "subject":
            return self._route_pooled(self.routing_embeddings(prompts)).cpu()
        self._ensure_calibrated()
        clause = cfg.gate == "clause" and not cfg.route_prefix
        out = []
        for i in range(0, len(prompts), 32):
            chunk = list(prompts[i : i + 32])
            q, valid = self.calibration.token_batch(self._route_hidden(chunk), None)
            if not clause:
                out.append(self.router.route_spans(q, valid, cfg.null_route).cpu())
                continue
            # the expert of the last clause: the one that answers
            enc = self.tokenizer(chunk, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
            ids, _ = pad_right(enc, pad_id(self.tokenizer, eos_fallback=False), self.access.device)
            gate = self._route_clauses(q, valid, ids)
            if cfg.expert_positions == "subject":
                out.append(gate.max(1).values.cpu())
            else:
                out.append(gate.gather(1, segments.last_valid(valid)[:, None]).squeeze(1).cpu())
        return torch.cat(out)

    # -- editing ---------------------------------------------------------------------------------
    def plan_batches(self, requests: Sequence[EditRequest], batch_size: int) -> list[list[EditRequest]]:
        """Clustered order (k-means over routing embeddings) unless ``order=arrival``."""
        cfg = self.cfg
        if cfg.order == "arrival" or batch_size <= 1 or len(requests) <= batch_size:
            return super().plan_batches(requests, batch_size)
        emb = self.routing_embeddings([r.prompt for r in requests])
        return plan_clustered(list(requests), emb, batch_size, seed=cfg.seed)

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        cfg = self.cfg
        self._ensure_calibrated()
        subject = cfg.route_key == "subject"
        q = None if subject else self.routing_embeddings([r.prompt for r in requests])
        chat = self._chat_wrap(cfg.chat_system) if cfg.train_chat else None
        split, preserve = training.training_parts(
            self.tokenizer, requests, cfg, chat, self.batches_applied, self.access.device
        )
        gen = torch.Generator().manual_seed(cfg.seed + self.batches_applied)
        expert = Expert(self.d_in, self.d_out, cfg.expert_width, self.init_std, gen)
        expert = expert.to(self.access.device, torch.float32)
        shared = cfg.expert_mode == "shared"
        if shared and self.n_experts > 0:
            self.bank.load_into(0, expert)
        try:
            steps, loss_value, acc = training.fit_expert(
                expert,
                split,
                preserve,
                cfg,
                logits_of=self._part_logits,
                frozen=lambda: self._mode("off"),
                training_mode=lambda: self._mode("train", expert),
                prepare=lambda part: training.prepare_part(self.model, self.access, self.layer, part),
            )
        finally:
            self._rt.train_mask = None
        index = self.edits.add_expert(expert, self.batches_applied, [r.request_id for r in requests], shared=shared)
        if subject:
            self._add_subject_keys(requests, index)
        else:
            assert q is not None
            keys = q if cfg.anchor_keys == "request" else F.normalize(q.mean(0, keepdim=True), dim=-1)
            self.router.add_prompt_keys(keys, index)
        return {
            "steps": steps,
            "loss": loss_value,
            "accuracy": acc,
            "experts": self.n_experts,
            "threshold": self.calibration.threshold,
        }

    def _part_logits(self, part: parts.Part, pos: torch.Tensor) -> torch.Tensor:
        """A part's logits at ``pos``, with the trained expert acting at the part's positions."""
        self._rt.train_mask = part.mask
        return training.part_logits(self.model, self.access, self.layer, part, pos)


def attn_mask_or_ones(attn: Any, b: int, t: int, device: torch.device) -> torch.Tensor:
    """The forward's attention mask as booleans ``[B, T]`` (all ones when absent or odd-shaped)."""
    if isinstance(attn, torch.Tensor) and attn.shape == (b, t):
        return attn.bool()
    return torch.ones(b, t, dtype=torch.bool, device=device)


def _validate(cfg: LEMoEConfig, layer: int, n_layers: int, route_layer: int, null_margin: float) -> None:
    """Reject bad options before anything touches the model."""
    checks = [
        (0 <= layer < n_layers, f"layer {layer} out of range for a {n_layers}-layer model"),
        (
            cfg.route_layer is None or 0 <= cfg.route_layer <= layer,
            f"route_layer must be in [0, layer={layer}], got {cfg.route_layer}",
        ),
        (0 <= route_layer <= layer, f"route_layer must be in [0, layer={layer}]"),
        (cfg.route_key in ("subject", "prompt"), "route_key must be subject or prompt"),
        (
            cfg.routing == "instance" or cfg.route_key == "prompt",
            "routing=token compares tokens with prompt keys: use it with route_key=prompt",
        ),
        (cfg.expert_width >= 1, "expert_width must be >= 1"),
        (cfg.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}"),
        (math.isfinite(cfg.scale), "scale must be finite"),
        (cfg.init_std is None or cfg.init_std > 0, "init_std must be > 0"),
        (cfg.expert_mode in ("new", "shared"), "expert_mode must be new or shared"),
        (
            cfg.expert_dtype in ("model", "float32", "bfloat16", "float16"),
            "expert_dtype must be model, float32, bfloat16 or float16",
        ),
        (cfg.routing in ("instance", "token"), "routing must be instance or token"),
        (cfg.anchor_keys in ("request", "centroid"), "anchor_keys must be request or centroid"),
        (0.0 <= cfg.null_quantile <= 1.0, "null_quantile must be in [0, 1]"),
        (math.isfinite(null_margin), "null_margin must be finite"),
        (cfg.lr > 0, "lr must be > 0"),
        (cfg.steps >= 1, "steps must be >= 1"),
        (cfg.extra_steps >= 0, "extra_steps must be >= 0"),
        (cfg.train_prefixes >= 0, "train_prefixes must be >= 0"),
        (cfg.preserve_relations >= 0, "preserve_relations must be >= 0"),
        (cfg.preserve_weight >= 0 and math.isfinite(cfg.preserve_weight), "preserve_weight must be >= 0"),
        (cfg.gate in ("clause", "sequence"), "gate must be clause or sequence"),
        (cfg.expert_positions in ("run", "subject"), "expert_positions must be run or subject"),
        (cfg.clause_min_tokens >= 1, "clause_min_tokens must be >= 1"),
        (0.0 < cfg.stop_accuracy <= 1.0, "stop_accuracy must be in (0, 1]"),
        (cfg.weight_decay >= 0, "weight_decay must be >= 0"),
        (cfg.order in ("cluster", "arrival"), "order must be cluster or arrival"),
        (cfg.route_index in ("auto", "exact", "hnsw"), "route_index must be auto, exact or hnsw"),
        (cfg.route_index_min_slots >= 1, "route_index_min_slots must be >= 1"),
        (cfg.route_index_neighbours >= 1, "route_index_neighbours must be >= 1"),
        (
            cfg.calibration_texts is None
            or (
                isinstance(cfg.calibration_texts, list)
                and len(cfg.calibration_texts) >= 2
                and all(isinstance(t, str) and t.strip() for t in cfg.calibration_texts)
            ),
            "calibration_texts must be a list of at least 2 non-empty strings",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"lemoe: {message}")
