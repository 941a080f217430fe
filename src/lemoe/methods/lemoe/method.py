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
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lemoe.batching import pad_id, pad_right
from lemoe.data.knowns import KNOWNS
from lemoe.methods.base import EditMethod, RollbackNotSupported, StateError
from lemoe.methods.lemoe import parts, router, segments, wording
from lemoe.methods.lemoe.config import LEMoEConfig
from lemoe.methods.lemoe.experts import ACTIVATIONS, Expert, ExpertBank, apply_per_sequence, apply_per_token
from lemoe.methods.lemoe.generic import GENERIC_PROMPTS
from lemoe.methods.lemoe.planning import plan_clustered
from lemoe.methods.training import build_lm_batch
from lemoe.models.access import weight_as_out_in
from lemoe.models.frozen import hidden_before_block, skip_frozen_blocks
from lemoe.models.kv_cache import cache_keyword, passed_cache, returned_cache
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
    extra: dict[str, Any] = field(default_factory=dict)


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
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
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
        # Calibration (depends on the base model and calibration text only; saved with the state).
        self.route_mean: torch.Tensor | None = None
        self.route_std: torch.Tensor | None = None
        self.threshold: float | None = None
        self._calibration: tuple[torch.Tensor, torch.Tensor] | None = None  # route_key=subject, runtime
        self._clear_edits()
        self._handles: list[Any] = []
        self._install_hooks()

    def _install_hooks(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True),
            self.model.register_forward_hook(self._on_model_done, always_call=True),
            self.access.blocks[self.route_layer].register_forward_pre_hook(self._on_route_input, with_kwargs=True),
            self.parts.input_module.register_forward_pre_hook(self._on_mlp_input),
            self.parts.out_proj.register_forward_hook(self._on_mlp_output),
        ]

    # -- state -----------------------------------------------------------------------------------
    def _clear_edits(self) -> None:
        self._state_epoch = getattr(self, "_state_epoch", 0) + 1  # see append_only_state
        dev, dt = self.access.device, self.access.dtype
        width = self.config.expert_width  # type: ignore[attr-defined]
        self.bank = ExpertBank.empty(self.d_in, self.d_out, width, dt, dev)
        d_route = self.access.hidden_size
        self.keys = torch.zeros(0, d_route, device=dev)
        self.key_expert = torch.zeros(0, dtype=torch.long, device=dev)
        # route_key=subject: ``keys`` and ``key_expert`` are per slot (one subject token); these say
        # which key a slot belongs to, its offset from the key's last token and the key's threshold.
        self.slot_key = torch.zeros(0, dtype=torch.long, device=dev)
        self.slot_offset = torch.zeros(0, dtype=torch.long, device=dev)
        self.slot_threshold = torch.zeros(0, device=dev)
        self.next_key = 0
        self.expert_batches: list[int] = []  # the batch index each expert was trained on
        self.expert_requests: list[list[str]] = []  # request ids per expert

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

    @property
    def n_experts(self) -> int:
        return len(self.bank)

    def reset(self) -> None:
        self._clear_edits()
        self.batches_applied = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._ensure_calibrated()
        assert self.route_mean is not None and self.route_std is not None and self.threshold is not None
        return {
            **{f"experts.{k}": v for k, v in self.bank.tensors().items()},
            "router.keys": self.keys,
            "router.key_expert": self.key_expert,
            "router.mean": self.route_mean,
            "router.std": self.route_std,
            "router.threshold": torch.tensor([self.threshold], dtype=torch.float64),
            "router.slot_key": self.slot_key,
            "router.slot_offset": self.slot_offset,
            "router.slot_threshold": self.slot_threshold,
        }

    def append_only_state(self) -> dict[str, int]:
        """Experts (one per batch), router keys and their slots, and the per-expert lists only grow
        by appending until a reset, load or rollback (each bumps the epoch). In shared-expert mode
        expert 0 and its request list change every batch, so they are not declared."""
        keys = [f"router.{k}" for k in ("keys", "key_expert", "slot_key", "slot_offset", "slot_threshold")]
        if self.config.expert_mode != "shared":  # type: ignore[attr-defined]
            keys += [f"experts.{k}" for k in ("w1", "b1", "w2", "b2")] + ["expert_batches", "expert_requests"]
        return dict.fromkeys(keys, self._state_epoch)

    def state_meta(self) -> dict[str, Any]:
        return {
            **super().state_meta(),
            "n_experts": self.n_experts,
            "expert_batches": list(self.expert_batches),
            "expert_requests": [list(r) for r in self.expert_requests],
            "route_key": self.config.route_key,  # type: ignore[attr-defined]
            "next_key": self.next_key,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        need = [f"experts.{k}" for k in ("w1", "b1", "w2", "b2")] + [
            f"router.{k}" for k in ("keys", "key_expert", "mean", "std", "threshold")
        ]
        missing = [k for k in need if k not in state]
        if missing:
            raise StateError(f"LEMoE state misses {missing}")
        w1, b1, w2, b2 = (state[f"experts.{k}"] for k in ("w1", "b1", "w2", "b2"))
        width, d = cfg.expert_width, self.access.hidden_size
        n = w1.shape[0] if w1.dim() == 3 else -1
        shapes_ok = (
            w1.shape == (n, width, self.d_in)
            and b1.shape == (n, width)
            and w2.shape == (n, self.d_out, width)
            and b2.shape == (n, self.d_out)
        )
        keys, key_expert = state["router.keys"], state["router.key_expert"]
        router_ok = (
            keys.dim() == 2
            and keys.shape[1] == d
            and key_expert.shape == (keys.shape[0],)
            and (key_expert.numel() == 0 or (int(key_expert.min()) >= 0 and int(key_expert.max()) < max(n, 1)))
            and state["router.mean"].shape == (d,)
            and state["router.std"].shape == (d,)
            and state["router.threshold"].numel() == 1
        )
        subject = cfg.route_key == "subject"
        slots = {k: state.get(f"router.slot_{k}") for k in ("key", "offset", "threshold")}
        if subject:
            router_ok = router_ok and all(v is not None and v.shape == (keys.shape[0],) for v in slots.values())
            router_ok = router_ok and meta.get("route_key", "prompt") == "subject"
        else:
            router_ok = router_ok and meta.get("route_key", "prompt") == "prompt"
        batches, reqs = meta.get("expert_batches"), meta.get("expert_requests")
        meta_ok = isinstance(batches, list) and isinstance(reqs, list) and len(batches) == n == len(reqs)
        if not (shapes_ok and router_ok and meta_ok):
            raise StateError("LEMoE state does not match this config/model (shapes or metadata inconsistent)")
        dev, dt = self.access.device, self.access.dtype
        self._state_epoch += 1
        self.bank = ExpertBank(*(t.to(device=dev, dtype=dt) for t in (w1, b1, w2, b2)))
        self.keys = keys.to(device=dev, dtype=torch.float32)
        self.key_expert = key_expert.to(device=dev, dtype=torch.long)
        self.route_mean = state["router.mean"].to(dev, torch.float32)
        self.route_std = state["router.std"].to(dev, torch.float32)
        self.threshold = float(state["router.threshold"])
        if subject:
            self.slot_key = slots["key"].to(dev, torch.long)  # type: ignore[union-attr]
            self.slot_offset = slots["offset"].to(dev, torch.long)  # type: ignore[union-attr]
            self.slot_threshold = slots["threshold"].to(dev, torch.float32)  # type: ignore[union-attr]
            default_next = int(self.slot_key.max()) + 1 if self.slot_key.numel() else 0
            self.next_key = int(meta.get("next_key", default_next))
        self.expert_batches = [int(b) for b in batches]
        self.expert_requests = [list(r) for r in reqs]
        self.batches_applied = int(meta.get("batches_applied", n))

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
        rt = self._rt
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        rt.active = True
        if ref is None:
            rt.decoding, rt.pool_mask, rt.choice = False, None, None
            return
        b, t = ref.shape[:2]
        rt.batch = b
        keep = (
            self.config.routing == "instance"  # type: ignore[attr-defined]
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
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        if cfg.route_key == "subject" and cfg.route_prefix and rt.mode == "route" and self.n_experts > 0:
            if ids is None:
                return  # inputs_embeds only: no token ids to route on, so no expert
            self._ensure_calibrated()
            self._decide(self._route_ids(ids, attn_mask_or_ones(attn, b, t, ids.device), mask))

    def _on_model_done(self, *_: Any) -> None:
        self._rt.active = False
        self._rt.x = None

    def _on_route_input(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rt = self._rt
        if not rt.active or rt.mode not in ("route", "observe") or rt.decoding:
            return
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if h.dim() == 2:  # flattened [B*T, d]
            h = h.view(rt.batch, -1, h.shape[-1])
        if rt.mode == "observe":
            rt.observed = h.detach()
            raise _Stop
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        if cfg.route_key == "subject" and cfg.route_prefix:
            return  # routed in the model pre-hook (its own pass behind the separator)
        if self.n_experts == 0:
            rt.choice = None
            return
        self._ensure_calibrated()
        mask = rt.pool_mask if rt.pool_mask is not None and rt.pool_mask.shape == h.shape[:2] else None
        if cfg.route_key == "subject":
            valid = mask if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            q = router.token_queries(h, self.route_mean, self.route_std)  # type: ignore[arg-type]
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
                self._decide(self._route_span_queries(q, valid))
        elif cfg.routing == "token":
            rt.choice = self._route_tokens(h)
        else:
            mask = mask if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            self._decide(self._route_queries(router.queries(h, mask, self.route_mean, self.route_std)))

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
        scale = self.config.scale  # type: ignore[attr-defined]
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

    # -- routing ---------------------------------------------------------------------------------
    def _route_queries(self, q: torch.Tensor) -> torch.Tensor:
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        choice, _ = router.route(q, self.keys, self.key_expert, self.threshold if cfg.null_route else None)
        return choice

    def _route_tokens(self, h: torch.Tensor) -> torch.Tensor:
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        q = router.token_queries(h, self.route_mean, self.route_std)  # type: ignore[arg-type]
        threshold = self._rt.extra.get("token_threshold") if cfg.null_route else None
        choice, _ = router.route(q, self.keys, self.key_expert, threshold)
        return choice

    def _prefix_id(self) -> int | None:
        """The separator put before every routed text (route_key=subject), or None."""
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        if cfg.route_key != "subject" or not cfg.route_prefix:
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

    def _token_batch(
        self, hidden: list[torch.Tensor], flags: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit standardised token vectors ``[B, T, d]`` and which of them may match ``[B, T]``."""
        width = max(h.shape[0] for h in hidden)
        d = hidden[0].shape[-1]
        q = torch.zeros(len(hidden), width, d, device=hidden[0].device)
        valid = torch.zeros(len(hidden), width, dtype=torch.bool, device=hidden[0].device)
        for r, h in enumerate(hidden):
            q[r, : h.shape[0]] = router.token_queries(h, self.route_mean, self.route_std)  # type: ignore[arg-type]
            valid[r, : h.shape[0]] = True if flags is None else flags[r].to(valid.device)
        return q, valid

    def _route_ids(self, ids: torch.Tensor, attn: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """route_key=subject: the expert of each sequence (``[B]``, ``NULL`` for none). The real
        tokens of each row are packed behind the separator (left or right padding alike)."""
        real = attn.bool()
        rows = [ids[b][real[b]].tolist() for b in range(ids.shape[0])]
        flags = [pool[b][real[b]] for b in range(ids.shape[0])]
        if any(len(r) == 0 for r in rows):
            rows = [r or [pad_id(self.tokenizer)] for r in rows]
            flags = [f if f.numel() else torch.zeros(1, dtype=torch.bool) for f in flags]
        q, valid = self._token_batch(self._observe_rows(rows), flags)
        return self._route_span_queries(q, valid).to(ids.device)

    def _token_classes(self) -> segments.TokenClasses:
        """Per-token clause flags of this tokenizer (built once, kept on the model's device)."""
        classes = self._rt_static.get("classes")
        if classes is None:
            vocab = int(self.model.get_input_embeddings().weight.shape[0])  # type: ignore[union-attr]
            classes = segments.token_classes(self.tokenizer, vocab).to(self.access.device)
            self._rt_static["classes"] = classes
        return classes

    def _route_clauses(self, q: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """gate=clause: the expert of every position (``[B, T]``, ``NULL`` for none).

        With ``expert_positions=subject`` only the matched subject's tokens in the question's
        clause get the expert; otherwise every position of the question's clauses does."""
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        seg, content = segments.clause_segments(ids, valid, self._token_classes())
        n_seg = int(seg.max()) + 1 if seg.numel() else 1
        scores, keys = router.span_window_scores(q, valid, self.keys, self.slot_key, self.slot_offset)
        per_clause = segments.clause_scores(scores, seg, n_seg)  # [B, S, K]
        expert = router.per_key(self.key_expert, self.slot_key, keys)
        threshold = router.per_key(self.slot_threshold, self.slot_key, keys) if cfg.null_route else None
        ok = per_clause >= threshold if threshold is not None else torch.isfinite(per_clause)
        masked = per_clause.masked_fill(~ok, float("-inf"))
        best = keys.numel() - 1 - masked.flip(-1).argmax(-1)  # [B, S]; ties go to the newest key
        choice = torch.where(ok.any(-1), expert.to(best.device)[best], torch.full_like(best, router.NULL))
        counts = segments.clause_content_counts(seg, content, n_seg)
        gate, opening = segments.gate_by_clause(choice, counts, seg[:, -1], cfg.clause_min_tokens)
        tokens = gate.gather(1, seg)
        if cfg.expert_positions == "run":
            return tokens
        key = best.gather(1, opening.clamp(min=0)[:, None])  # [B, 1] the matched key
        window = scores.gather(2, key[:, :, None].expand(-1, scores.shape[1], 1)).squeeze(-1)
        end = window.masked_fill(seg != opening[:, None], float("-inf")).argmax(1, keepdim=True)
        length = torch.zeros(keys.numel(), dtype=torch.long, device=q.device)
        length = length.index_add_(0, torch.searchsorted(keys, self.slot_key), torch.ones_like(self.slot_key))
        start = end - length[key] + 1
        pos = torch.arange(tokens.shape[1], device=q.device)[None, :]
        on = (pos >= start) & (pos <= end) & (opening[:, None] >= 0)
        return torch.where(on, tokens, torch.full_like(tokens, router.NULL))

    def _route_span_queries(self, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        scores, keys = router.span_scores(q, valid, self.keys, self.slot_key, self.slot_offset)
        expert = router.per_key(self.key_expert, self.slot_key, keys)
        threshold = router.per_key(self.slot_threshold, self.slot_key, keys) if cfg.null_route else None
        return router.route_spans(scores, threshold, expert)

    def _calibration_texts(self) -> list[str]:
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        if cfg.calibration_texts is not None:
            return list(cfg.calibration_texts)
        knowns = [prompt for _, prompt, _ in KNOWNS] if cfg.route_key == "subject" else []
        return list(GENERIC_PROMPTS) + knowns

    def _ensure_calibrated(self) -> None:
        """Standardisation statistics and the null threshold, from calibration text only (once)."""
        if self.route_mean is not None and self.threshold is not None:
            self._ensure_token_threshold()
            return
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        hidden = self._route_hidden(self._calibration_texts())
        self.route_mean, self.route_std = router.standardisation(hidden)
        q = self._pool(hidden)
        self.threshold = router.calibrate_threshold(q, cfg.null_quantile, self.null_margin)
        if cfg.route_key == "subject":
            self._calibration = self._token_batch(hidden, None)
        self._ensure_token_threshold(hidden)

    def _calibration_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors of the calibration text (route_key=subject; recomputed after a load)."""
        self._ensure_calibrated()
        if self._calibration is None:
            self._calibration = self._token_batch(self._route_hidden(self._calibration_texts()), None)
        return self._calibration

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
            tokens = h[idx] if idx else h
            spans.append(router.token_queries(tokens, self.route_mean, self.route_std))  # type: ignore[arg-type]
        return spans

    def _key_wraps(self) -> list[tuple[str, str]]:
        """The contexts each subject key is read in: the bare prompt, and with ``context_keys``
        the prompt inside the chat template and behind a generic sentence. A subject at the start
        of a bare prompt sits on the model's first position, whose states differ from the same
        words mid-text (where paraphrases and chat questions put it)."""
        wraps = [("", "")]
        if self.config.context_keys:  # type: ignore[attr-defined]
            chat = self._chat_wrap()
            if chat is not None:
                wraps.append(chat)
            wraps.append((GENERIC_PROMPTS[0] + " ", ""))
        return wraps

    def _chat_wrap(self, system: str | None = None) -> tuple[str, str] | None:
        """(text before, text after) a user message in the tokenizer's chat template, or None.
        ``system``: a system message to put first (None: the template's own default)."""
        cache_key = f"chat_wrap:{system!r}"
        if cache_key not in self._rt_static:
            wrap = None
            if getattr(self.tokenizer, "chat_template", None):
                marker = "\x00MSG\x00"
                messages = [{"role": "user", "content": marker}]
                if system is not None:
                    messages.insert(0, {"role": "system", "content": system})
                try:
                    text = self.tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                        messages, tokenize=False, add_generation_prompt=True
                    )
                except Exception:  # a template that rejects this conversation: no chat wording
                    text = ""
                if isinstance(text, str) and text.count(marker) == 1:
                    head, tail = text.split(marker)
                    bos = getattr(self.tokenizer, "bos_token", None)
                    wrap = (head[len(bos) :] if bos and head.startswith(bos) else head, tail)
            self._rt_static[cache_key] = wrap
        return self._rt_static[cache_key]

    def _add_subject_keys(self, requests: Sequence[EditRequest], index: int) -> None:
        """Append the keys of a batch (all routed to expert ``index``) with their thresholds."""
        spans = [span for wrap in self._key_wraps() for span in self._subject_keys(requests, wrap)]
        vecs, key, offset = router.span_slots(spans, self.next_key)
        qc, vc = self._calibration_queries()
        cal, _ = router.span_scores(qc, vc, vecs, key, offset)
        threshold = router.span_thresholds(cal, self.null_margin)[key - self.next_key]
        dev = self.keys.device
        self.keys = torch.cat([self.keys, vecs.to(dev)])
        self.key_expert = torch.cat([self.key_expert, torch.full_like(key, index).to(dev)])
        self.slot_key = torch.cat([self.slot_key, key.to(dev)])
        self.slot_offset = torch.cat([self.slot_offset, offset.to(dev)])
        self.slot_threshold = torch.cat([self.slot_threshold, threshold.to(dev)])
        self.next_key += len(spans)

    def _ensure_token_threshold(self, hidden: list[torch.Tensor] | None = None) -> None:
        """Token-level gating's threshold: how close a generic token gets to another generic
        prompt's routing embedding (the same rule, per token)."""
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        if cfg.routing != "token" or "token_threshold" in self._rt.extra:
            return
        hidden = hidden if hidden is not None else self._route_hidden(self._calibration_texts())
        q = self._pool(hidden)
        best = []
        for i, h in enumerate(hidden):
            s = router.token_queries(h, self.route_mean, self.route_std) @ q.T  # type: ignore[arg-type]
            s[:, i] = -1.0
            best.append(s.max(1).values)
        scores = torch.cat(best)
        t = float(torch.quantile(scores, cfg.null_quantile)) + self.null_margin
        self._rt.extra["token_threshold"] = min(t, 0.999)

    def _pool(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        assert self.route_mean is not None and self.route_std is not None
        return torch.stack(
            [
                router.queries(
                    h[None],
                    torch.ones(1, h.shape[0], dtype=torch.bool, device=h.device),
                    self.route_mean,
                    self.route_std,
                )[0]
                for h in hidden
            ]
        )

    def routing_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit routing embeddings ``[n, d]`` of prompts (what the router compares with keys)."""
        self._ensure_calibrated()
        return self._pool(self._route_hidden(prompts))

    def route_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The expert each prompt is routed to (``-1``: none), computed as at inference."""
        if self.keys.shape[0] == 0:
            return torch.full((len(prompts),), router.NULL, dtype=torch.long)
        if self.config.route_key == "subject":  # type: ignore[attr-defined]
            self._ensure_calibrated()
            clause = self.config.gate == "clause" and not self.config.route_prefix  # type: ignore[attr-defined]
            out = []
            for i in range(0, len(prompts), 32):
                chunk = list(prompts[i : i + 32])
                q, valid = self._token_batch(self._route_hidden(chunk), None)
                if clause:  # the expert of the last clause: the one that answers
                    enc = self.tokenizer(chunk, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
                    ids, _ = pad_right(enc, pad_id(self.tokenizer, eos_fallback=False), self.access.device)
                    gate = self._route_clauses(q, valid, ids)
                    if self.config.expert_positions == "subject":  # type: ignore[attr-defined]
                        out.append(gate.max(1).values.cpu())
                    else:
                        out.append(gate.gather(1, segments.last_valid(valid)[:, None]).squeeze(1).cpu())
                else:
                    out.append(self._route_span_queries(q, valid).cpu())
            return torch.cat(out)
        return self._route_queries(self.routing_embeddings(prompts)).cpu()

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

    # -- editing ---------------------------------------------------------------------------------
    def plan_batches(self, requests: Sequence[EditRequest], batch_size: int) -> list[list[EditRequest]]:
        """Clustered order (k-means over routing embeddings) unless ``order=arrival``."""
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        if cfg.order == "arrival" or batch_size <= 1 or len(requests) <= batch_size:
            return super().plan_batches(requests, batch_size)
        emb = self.routing_embeddings([r.prompt for r in requests])
        return plan_clustered(list(requests), emb, batch_size, seed=cfg.seed)

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        self._ensure_calibrated()
        subject = cfg.route_key == "subject"
        q = None if subject else self.routing_embeddings([r.prompt for r in requests])
        eos = getattr(self.tokenizer, "eos_token", None) if cfg.train_stop else None
        chat = self._chat_wrap(cfg.chat_system) if cfg.train_chat else None
        prefixes = [
            (lambda i, k=k: _context(self.batches_applied, i, k)) for k in range(cfg.train_prefixes)
        ]  # the same edits behind unrelated context
        rows = wording.training_rows(requests, eos or "", chat, prefixes, cfg.preserve_relations)
        # A preservation row has no target; it is scored at its last prompt position only.
        batch = build_lm_batch(self.tokenizer, [r.text for r in rows], [r.target or "x" for r in rows])
        preserve = torch.tensor([r.preserve for r in rows])
        batch.target_mask[preserve] = False
        batch = batch.to(self.access.device)
        positions = "subject" if cfg.gate == "clause" and cfg.expert_positions == "subject" else "run"
        width = batch.input_ids.shape[1]
        mask = wording.expert_mask(self.tokenizer, rows, width, positions)
        mask |= (batch.target_mask & (positions == "run")).cpu()  # run: the answer continues the clause
        in_chat = torch.tensor(
            [bool(chat and chat[0]) and r.prompt_start == len(chat[0]) and r.text.startswith(chat[0]) for r in rows]
        )
        mask = mask.to(self.access.device)
        if cfg.share_prefix:  # the chat rows' template prefix runs once per batch, not once per step
            training_parts = parts.split_shared_prefix(batch, mask, in_chat)
        else:
            training_parts = [parts.Part(torch.arange(len(rows), device=mask.device), batch, mask)]
        gen = torch.Generator().manual_seed(cfg.seed + self.batches_applied)
        expert = Expert(self.d_in, self.d_out, cfg.expert_width, self.init_std, gen)
        expert = expert.to(self.access.device, torch.float32)
        shared = cfg.expert_mode == "shared" and self.n_experts > 0
        if shared:
            self.bank.load_into(0, expert)
        try:
            steps, loss_value, acc = self._train(expert, training_parts, preserve.to(self.access.device))
        finally:
            self._rt.train_mask = None
        index = 0 if cfg.expert_mode == "shared" else self.n_experts
        if shared:
            self.bank = self.bank.replace(0, expert)
            self.expert_requests[0].extend(r.request_id for r in requests)
        else:
            self.bank = self.bank.append(expert)
            self.expert_batches.append(self.batches_applied)
            self.expert_requests.append([r.request_id for r in requests])
        if subject:
            self._add_subject_keys(requests, index)
            return self._apply_report(steps, loss_value, acc)
        assert q is not None
        keys = q if cfg.anchor_keys == "request" else F.normalize(q.mean(0, keepdim=True), dim=-1)
        self.keys = torch.cat([self.keys, keys.to(self.keys)])
        self.key_expert = torch.cat(
            [self.key_expert, torch.full((keys.shape[0],), index, dtype=torch.long, device=self.key_expert.device)]
        )
        return self._apply_report(steps, loss_value, acc)

    def _apply_report(self, steps: int, loss_value: float, acc: float) -> dict[str, Any]:
        return {
            "steps": steps,
            "loss": loss_value,
            "accuracy": acc,
            "experts": self.n_experts,
            "threshold": self.threshold,
        }

    def _train(
        self, expert: Expert, training_parts: list[parts.Part], preserve: torch.Tensor
    ) -> tuple[int, float, float]:
        """AdamW on the target NLL (plus the KL to the base model on preservation rows); frozen
        blocks below the layer, and a shared token prefix of a part at every layer, computed once;
        early stop when the targets are learned."""
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        with self._mode("off"):
            for part in training_parts:
                self._prepare_part(part)
        opt = torch.optim.AdamW(expert.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps, loss_value, acc, extra_left = 0, float("nan"), 0.0, cfg.extra_steps
        # Per part: positions predicting targets (pos) and, on preservation rows, the position after
        # the prompt (keep); flattened over parts in order, with each position's row in the batch.
        sel, is_target, labels, row_of = [], [], [], []
        for part in training_parts:
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
        n_rows = preserve.shape[0]
        counts = torch.zeros(n_rows, device=rows.device).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))
        counts = counts.clamp(min=1.0)
        edit_rows = ~preserve

        def logits() -> torch.Tensor:
            return torch.cat([self._part_logits(part, s) for part, s in zip(training_parts, sel, strict=True)])

        base_logp = None
        if bool((~is_target_all).any()):
            with self._mode("off"), torch.no_grad():
                base_logp = F.log_softmax(logits()[~is_target_all].float(), -1)
        with self._mode("train", expert):
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

    def _prefix_forward(self, part: parts.Part) -> dict[str, Any]:
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
            cache_keyword(self.model): cache,
            "use_cache": True,
        }

    def _prepare_part(self, part: parts.Part) -> None:
        """The prefix's KV cache (once) and the edited block's input for the part's rows (once)."""
        if part.start:
            assert part.prefix_ids is not None
            part.prefix_cache = returned_cache(self.model(input_ids=part.prefix_ids, use_cache=True))
        kwargs = self._prefix_forward(part)
        attn = kwargs.pop("attention_mask")
        part.hidden, part.tuple_out = hidden_before_block(self.access, self.layer, part.batch.input_ids, attn, **kwargs)

    def _part_logits(self, part: parts.Part, pos: torch.Tensor) -> torch.Tensor:
        """Logits at the positions that predict target tokens only (the LM head over a 49k
        vocabulary on every position would cost more than the blocks above the edited layer)."""
        assert part.hidden is not None
        self._rt.train_mask = part.mask
        base = self.model.base_model
        kwargs = self._prefix_forward(part)
        if part.start:  # the base model takes the cache under its own keyword
            kwargs[cache_keyword(base)] = kwargs.pop(cache_keyword(self.model))
        with skip_frozen_blocks(self.access, self.layer, part.hidden, part.tuple_out):
            out = base(input_ids=part.batch.input_ids, **kwargs)
        h = out[0][:, :-1][pos]
        logits = self.model.get_output_embeddings()(h)
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def rollback(self, batch_index: int) -> None:
        """Remove the expert trained on batch ``batch_index``; every other expert is untouched."""
        cfg: LEMoEConfig = self.config  # type: ignore[assignment]
        if cfg.expert_mode == "shared":
            raise RollbackNotSupported("expert_mode=shared mixes every batch into one expert")
        if batch_index not in self.expert_batches:
            raise KeyError(f"no expert for batch {batch_index} (have {self.expert_batches})")
        p = self.expert_batches.index(batch_index)
        self._state_epoch += 1
        self.bank = self.bank.remove(p)
        keep = self.key_expert != p
        self.keys = self.keys[keep]
        if self.slot_key.numel():
            self.slot_key = self.slot_key[keep]
            self.slot_offset = self.slot_offset[keep]
            self.slot_threshold = self.slot_threshold[keep]
        ke = self.key_expert[keep]
        self.key_expert = torch.where(ke > p, ke - 1, ke)
        del self.expert_batches[p]
        del self.expert_requests[p]

    def parameters_per_expert(self) -> int:
        w = self.config.expert_width  # type: ignore[attr-defined]
        return w * self.d_in + w + self.d_out * w + self.d_out


def _context(batch: int, item: int, k: int) -> str:
    """A deterministic unrelated sentence to put before an edit prompt (``train_prefixes``)."""
    return GENERIC_PROMPTS[(batch * 7 + item * 3 + k * 11) % len(GENERIC_PROMPTS)]


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
