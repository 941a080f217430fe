"""O-Edit and O-Edit+: sequential editing in mutually orthogonal subspaces (Cai & Cao, arXiv 2410.11469).

The paper published no code and no equations; this is a reconstruction that follows Gradient
Projection Memory (GPM, Saha et al. 2021), whose vocabulary it shares. Every choice below is an
option of :class:`~lemoe.methods.oedit.config.OEditConfig`:

1. **What is edited** (``layers``): the MLP output projection ``W_out`` of one middle layer
   (default ``ModelAccess.default_edit_layer()``, layer 17 of SmolLM2's 30), or several layers
   jointly. Each edit (one request or a small batch) is a few optimiser steps of FT-M's loss (NLL of
   the target tokens only; ``optimizer``, ``lr``, ``steps``, early stop at ``stop_accuracy``),
   reusing the frozen blocks below the lowest edited layer (:mod:`lemoe.models.frozen`).
   **Update parametrisation** (``update_space``, ``key_positions``): by default the update is
   ``dW = A K^T`` with ``K`` an orthonormal basis of this batch's keys at the edited layer (W_out's
   inputs at the last prompt token and the target tokens; ``"all"``: every token) and only ``A``
   trained with Adam (``lr`` 5e-2). Plain gradient descent on one W_out never leaves the span of
   the batch's keys (its gradient is ``sum_t d_t x_t^T``); Adam's per-coordinate scaling does, and
   measured on SmolLM2 it spread one edit over 24–79 directions at 0.9 energy (the basis would be
   full after a few dozen edits) against 1–3 with ``A K^T``. ``"full"`` trains every entry of
   ``dW`` (FT-M-like; use ``lr`` ~5e-4). The update rides on a forward hook during optimisation
   and is folded into the weight at the end, so ``W_out`` itself is only written once per edit.
2. **Where the bases live** (``side``): ``in`` (default) — directions of W_out's *input* space
   (the MLP keys, ``D = d_ff`` = 1536). ``dW B = 0`` then means the update leaves W_out's output on
   every key in span(B) unchanged, which is exactly "do not disturb earlier edits / knowledge" and is
   what GPM projects for linear layers. ``out`` — directions of W_out's output space (``D = d_model``
   = 576, a smaller capacity).
3. **B_e, earlier edits**: after each edit the update ``dW = W_after - W_before`` is factored by SVD;
   the fewest new singular vectors that, with the part of ``dW`` already in span(B), hold
   ``edit_energy`` (0.9) of ``||dW||_F^2`` join B_e, orthogonalised against everything stored (GPM's
   threshold rule, :func:`subspace.new_directions`).
4. **B_k, pre-existing knowledge** (``knowledge_source``, ``knowledge_rank`` = q, ``knowledge_energy``,
   ``knowledge_text``): the rank-q SVD (top eigenvectors of the second moment) of W_out's keys — or
   of per-text NLL gradients — on generic text: by default the 200 ROME "knowns" packaged in
   :mod:`lemoe.data.knowns`; ``knowledge_text="model"`` uses passages sampled from the model itself
   by the locate core's cached sampler (offline, the issue's "model-generated text"); a text file or
   ``KIND:PATH`` data spec uses the user's text (:mod:`.knowledge` says which tokens count and why).
   Computed once from the unedited model, on the first edit. B_k comes first; B_e is orthogonalised
   against it, so the stored columns ``[B_k | B_e]`` are jointly orthonormal.
5. **O-Edit** (``mode="soft"``, registry ``oedit``): the edit loss plus ``ortho_weight`` times the
   fraction of the update's energy inside span(B_k ∪ B_e) (:func:`subspace.overlap_penalty`).
   **O-Edit+** (``mode="hard"``, registry ``oedit-plus``): the update is projected onto the
   orthogonal complement — during optimisation (``hard_when="step"``: with ``A K^T`` on the input
   side ``K`` is built from the keys' component orthogonal to the bases, so every step is inside
   the complement by construction; otherwise ``A`` is projected after every step — projected
   gradient descent) or once after the edit
   (``hard_when="final"``, the literal "project after each update"). ``mode="none"`` is FT-M with
   the same bookkeeping, for ablations.
6. **Capacity** (``max_rank_fraction``, ``capacity_policy``): the bases may fill at most
   ``max_rank_fraction * D`` dimensions per layer, leaving room for edits to happen at all. When an
   edit needs more directions than are left, the directions that fit are stored and a
   :class:`CapacityWarning` is issued (once per layer). Afterwards, with ``capacity_policy="raise"``
   every further ``apply`` raises :class:`CapacityExhausted` before changing anything; with
   ``"warn"`` editing continues against the now frozen basis (new edits stay orthogonal to
   knowledge and to the recorded edits, but not to each other). :meth:`OEdit.capacity` reports the
   rank used per layer and the capacity left at any time.

State (``state_dict``): per layer the weight delta, B_k and B_e; meta records ranks, saturation and
the rank added by each batch. Bases are float32 ``[D, r]`` with orthonormal columns.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lemoe.methods.base import EditMethod, StateError
from lemoe.methods.oedit import subspace
from lemoe.methods.oedit.config import OEditConfig, OEditPlusConfig
from lemoe.methods.oedit.knowledge import (
    cached_knowledge_covariance,
    load_knowledge_text,
    target_nll,
    target_positions,
)
from lemoe.methods.training import build_lm_batch
from lemoe.models.access import weight_as_out_in
from lemoe.models.frozen import hidden_before_block, skip_frozen_blocks
from lemoe.models.logits import logits_only_at
from lemoe.requests import EditRequest

ORTHONORMAL_TOL = 1e-3


class CapacityWarning(UserWarning):
    """The bases of a layer reached ``max_rank_fraction`` of its space."""


class CapacityExhausted(RuntimeError):
    """``capacity_policy="raise"`` and the bases are full: the edit was refused, nothing changed."""


class OEdit(EditMethod):
    """O-Edit (soft orthogonality penalty); O-Edit+ is the same class with ``mode="hard"``."""

    name = "oedit"
    config_class = OEditConfig

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: OEditConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        cfg: OEditConfig = self.config  # type: ignore[assignment]
        n = self.access.num_layers
        layers = cfg.layers if cfg.layers is not None else [self.access.default_edit_layer()]
        for layer in layers:
            if not 0 <= layer < n:
                raise ValueError(f"{self.name}: layer {layer} out of range for a {n}-layer model")
        self.layers: list[int] = sorted(layers)
        self.modules = [self.access.mlp(layer).out_proj for layer in self.layers]
        self.original = [weight_as_out_in(m).detach().clone() for m in self.modules]
        self.dims = [w.shape[1] if cfg.side == "in" else w.shape[0] for w in self.original]
        self.limits = [int(cfg.max_rank_fraction * d) for d in self.dims]
        self.knowledge: list[torch.Tensor] | None = None  # B_k per layer, computed on the first edit
        self.knowledge_info: dict[str, Any] = {}  # which text built B_k (its hash for passages)
        self.edits = [subspace.empty_basis(d) for d in self.dims]  # B_e per layer
        self.saturated = [False] * len(self.layers)
        self.rank_history: list[list[int]] = []  # directions added to B_e by each batch, per layer
        self._previous_update: list[torch.Tensor | None] = [None] * len(self.layers)

    # -- bases ---------------------------------------------------------------------------------------
    def ensure_knowledge(self) -> None:
        """Compute B_k from the unedited model (once; reset keeps it, it depends only on the base)."""
        if self.knowledge is not None:
            return
        cfg: OEditConfig = self.config  # type: ignore[assignment]
        if cfg.knowledge_source == "none" or cfg.knowledge_rank == 0:
            self.knowledge = [subspace.empty_basis(d) for d in self.dims]
            return
        if self.batches_applied:
            raise StateError(f"{self.name}: B_k must come from the unedited model, but edits were applied")
        text = load_knowledge_text(
            self.model,
            self.tokenizer,
            cfg.knowledge_text,
            cfg.knowledge_count,
            cfg.knowledge_max_tokens,
            fingerprint=self.base_fingerprint,
        )
        covs = cached_knowledge_covariance(
            self.access,
            self.tokenizer,
            self.layers,
            text,
            source=cfg.knowledge_source,
            side=cfg.side,
            fingerprint=self.base_fingerprint,
            use_cache=cfg.cache_knowledge,
        )
        self.knowledge_info = text.describe()
        self.knowledge = [
            subspace.top_eigenspace(covs[layer].cpu(), min(cfg.knowledge_rank, limit), cfg.knowledge_energy)
            for layer, limit in zip(self.layers, self.limits, strict=True)
        ]

    def basis(self, i: int) -> torch.Tensor:
        """All protected directions of layer ``self.layers[i]``: ``[B_k | B_e]``, orthonormal."""
        assert self.knowledge is not None
        return torch.cat([self.knowledge[i], self.edits[i]], dim=1)

    def capacity(self) -> list[dict[str, Any]]:
        """Per layer: space dimension, limit, rank of B_k and B_e, capacity left, saturation."""
        out = []
        for i, layer in enumerate(self.layers):
            k = 0 if self.knowledge is None else self.knowledge[i].shape[1]
            e = self.edits[i].shape[1]
            out.append(
                {
                    "layer": layer,
                    "dim": self.dims[i],
                    "limit": self.limits[i],
                    "knowledge_rank": k,
                    "edit_rank": e,
                    "capacity_left": max(self.limits[i] - k - e, 0),
                    "saturated": self.saturated[i],
                }
            )
        return out

    # -- editing -------------------------------------------------------------------------------------
    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        cfg: OEditConfig = self.config  # type: ignore[assignment]
        if cfg.capacity_policy == "raise" and any(self.saturated):
            full = [layer for layer, s in zip(self.layers, self.saturated, strict=True) if s]
            raise CapacityExhausted(
                f"{self.name}: the bases of layer(s) {full} are full (capacity_policy='raise'); "
                "the edit was refused and the model is unchanged. Inspect .capacity(); raise "
                "max_rank_fraction, lower edit_energy or knowledge_rank, or use capacity_policy='warn'."
            )
        self.ensure_knowledge()
        device = self.access.device
        batch = build_lm_batch(self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
        batch = batch.to(device)
        pos, tokens, valid = target_positions(batch)
        low = self.layers[0]
        hidden, tuple_out = hidden_before_block(self.access, low, batch.input_ids, batch.attention_mask)
        before = [weight_as_out_in(m).detach().clone() for m in self.modules]
        bases = [self.basis(i).to(device) for i in range(len(self.layers))]
        hard_step = cfg.mode == "hard" and cfg.hard_when == "step"
        with skip_frozen_blocks(self.access, low, hidden, tuple_out):
            spans: list[torch.Tensor | None] = [None] * len(self.layers)
            if cfg.update_space == "keys":
                keys = self._batch_keys(batch)
                spans = [
                    subspace.key_span(k, b if hard_step and cfg.side == "in" else None)
                    for k, b in zip(keys, bases, strict=True)
                ]
            factors = [
                torch.zeros(w.shape[0], w.shape[1] if k is None else k.shape[1], device=device, requires_grad=True)
                for w, k in zip(before, spans, strict=True)
            ]
            opt: torch.optim.Optimizer = (
                torch.optim.Adam(factors, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(factors, lr=cfg.lr)
            )
            steps_run, loss_value, penalty_value = 0, float("nan"), 0.0
            handles = [_add_update_hook(m, a, k) for m, a, k in zip(self.modules, factors, spans, strict=True)]
            try:
                for _ in range(cfg.steps):
                    nll, acc = target_nll(self.model, batch, pos, tokens, valid)
                    if float(acc.min()) >= cfg.stop_accuracy:
                        break
                    loss = nll.mean()
                    if cfg.mode == "soft" and cfg.ortho_weight > 0:
                        penalty = sum(
                            subspace.overlap_penalty(subspace.expand(a, k), b, cfg.side)
                            for a, k, b in zip(factors, spans, bases, strict=True)
                        )
                        penalty_value = float(penalty.detach())
                        loss = loss + cfg.ortho_weight * penalty
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps_run += 1
                    loss_value = float(nll.detach().mean())
                    if hard_step:
                        with torch.no_grad():
                            for a, k, b in zip(factors, spans, bases, strict=True):
                                a.copy_(subspace.project_factor(a, k, b, cfg.side))
            finally:
                for h in handles:
                    h.remove()
        with torch.no_grad():
            for m, w0, a, k, b in zip(self.modules, before, factors, spans, bases, strict=True):
                update = subspace.expand(a.detach(), k)
                if cfg.mode == "hard":  # exact for "final"; removes round-off for "step"
                    update = subspace.project_out(update, b, cfg.side)
                weight_as_out_in(m).copy_(w0 + update)
        info = {"steps": steps_run, "loss": loss_value, "penalty": penalty_value}
        info["span_rank"] = [None if k is None else k.shape[1] for k in spans]
        return {**info, **self._record(before)}

    @torch.no_grad()
    def _batch_keys(self, batch: Any) -> list[torch.Tensor]:
        """Inputs of each edited W_out at every real token of the batch ``[tokens, d_ff]``, taken from
        the model as it is before this edit (inside the frozen-prefix context)."""
        seen: dict[int, torch.Tensor] = {}
        handles = [
            m.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].detach()))
            for i, m in enumerate(self.modules)
        ]
        try:
            with logits_only_at(self.model, None):
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        cfg: OEditConfig = self.config  # type: ignore[assignment]
        if cfg.key_positions == "all":
            where = batch.attention_mask.bool()
        else:  # the positions whose outputs predict target tokens: last prompt token onward
            where = batch.target_mask.clone()
            where[:, :-1] |= batch.target_mask[:, 1:]
            where &= batch.attention_mask.bool()
        return [seen[i][where].float() for i in range(len(self.modules))]

    @torch.no_grad()
    def _record(self, before: list[torch.Tensor]) -> dict[str, Any]:
        """Grow B_e from this batch's update; return per-layer diagnostics."""
        cfg: OEditConfig = self.config  # type: ignore[assignment]
        added, layers_info = [], []
        for i, (m, b0) in enumerate(zip(self.modules, before, strict=True)):
            update = (weight_as_out_in(m) - b0).float().cpu()
            basis = self.basis(i)
            norm = float(update.norm())
            inside = float(subspace.component_in(update, basis, cfg.side).norm()) / norm if norm > 0 else 0.0
            prev = self._previous_update[i]
            cos = (
                float(torch.nn.functional.cosine_similarity(update.flatten(), prev.flatten(), dim=0))
                if (prev is not None and norm > 0 and float(prev.norm()) > 0)
                else None
            )
            self._previous_update[i] = update
            room = self.limits[i] - basis.shape[1]
            new = subspace.new_directions(update, basis, cfg.side, cfg.edit_energy, room)
            wanted = new.shape[1] if new.shape[1] < room else self._wanted_rank(update, basis)
            self.edits[i] = torch.cat([self.edits[i], new], dim=1)
            if wanted > new.shape[1] and not self.saturated[i]:
                self.saturated[i] = True
                warnings.warn(
                    f"{self.name}: layer {self.layers[i]} bases are full ({basis.shape[1] + new.shape[1]} of "
                    f"{self.dims[i]} dimensions, limit {self.limits[i]}); policy {cfg.capacity_policy!r}: "
                    + (
                        "further edits will be refused"
                        if cfg.capacity_policy == "raise"
                        else "editing continues against a frozen basis"
                    ),
                    CapacityWarning,
                    stacklevel=4,
                )
            added.append(new.shape[1])
            layers_info.append(
                {
                    "layer": self.layers[i],
                    "update_norm": norm,
                    "inside_fraction": inside,  # ||P_B dW|| / ||dW|| against the bases before this edit
                    "cos_previous": cos,
                    "added_rank": new.shape[1],
                    "edit_rank": self.edits[i].shape[1],
                    "capacity_left": max(self.limits[i] - self.basis(i).shape[1], 0),
                }
            )
        self.rank_history.append(added)
        return {"layers": layers_info}

    def _wanted_rank(self, update: torch.Tensor, basis: torch.Tensor) -> int:
        """How many directions the update would need with unlimited room (to detect saturation)."""
        cfg: OEditConfig = self.config  # type: ignore[assignment]
        return subspace.new_directions(update, basis, cfg.side, cfg.edit_energy, room=basis.shape[0]).shape[1]

    # -- lifecycle and state -------------------------------------------------------------------------
    def reset(self) -> None:
        with torch.no_grad():
            for m, w0 in zip(self.modules, self.original, strict=True):
                weight_as_out_in(m).copy_(w0)
        self.edits = [subspace.empty_basis(d) for d in self.dims]
        self.saturated = [False] * len(self.layers)
        self.rank_history = []
        self._previous_update = [None] * len(self.layers)
        self.batches_applied = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.knowledge is None:
            self.ensure_knowledge()
        state: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            state[f"layer{layer}.delta"] = (weight_as_out_in(self.modules[i]).detach() - self.original[i]).cpu()
            state[f"layer{layer}.edits"] = self.edits[i]
            if self.knowledge is not None:
                state[f"layer{layer}.knowledge"] = self.knowledge[i]
        return state

    def state_meta(self) -> dict[str, Any]:
        return {
            **super().state_meta(),
            "layers": self.layers,
            "saturated": self.saturated,
            "rank_history": self.rank_history,
            "capacity": self.capacity(),
            "knowledge_text": self.knowledge_info,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Validate everything first (shapes, orthonormality, layers), then apply: a bad state
        raises :class:`StateError` and changes nothing."""
        if list(meta.get("layers", [])) != self.layers:
            raise StateError(f"{self.name}: state is for layers {meta.get('layers')}, this config edits {self.layers}")
        knowledge, edits, deltas = [], [], []
        for i, layer in enumerate(self.layers):
            for part in ("delta", "edits", "knowledge"):
                if f"layer{layer}.{part}" not in state:
                    raise StateError(f"{self.name}: state lacks 'layer{layer}.{part}'")
            delta = state[f"layer{layer}.delta"]
            if tuple(delta.shape) != tuple(self.original[i].shape):
                raise StateError(f"{self.name}: layer {layer} delta has shape {tuple(delta.shape)}")
            k, e = state[f"layer{layer}.knowledge"].float(), state[f"layer{layer}.edits"].float()
            for name, b in (("knowledge", k), ("edits", e)):
                if b.dim() != 2 or b.shape[0] != self.dims[i]:
                    raise StateError(f"{self.name}: layer {layer} {name} basis has shape {tuple(b.shape)}")
            both = torch.cat([k, e], dim=1)
            if both.shape[1] > self.dims[i]:
                raise StateError(f"{self.name}: layer {layer} bases have more columns than dimensions")
            gram = both.T @ both
            if both.shape[1] and float((gram - torch.eye(both.shape[1])).abs().max()) > ORTHONORMAL_TOL:
                raise StateError(f"{self.name}: layer {layer} bases are not orthonormal (corrupt state?)")
            knowledge.append(k)
            edits.append(e)
            deltas.append(delta)
        saturated = list(meta.get("saturated", [False] * len(self.layers)))
        if len(saturated) != len(self.layers):
            raise StateError(f"{self.name}: 'saturated' does not match the layers")
        with torch.no_grad():
            for m, w0, d in zip(self.modules, self.original, deltas, strict=True):
                weight_as_out_in(m).copy_(w0 + d.to(w0))
        self.knowledge, self.edits, self.saturated = knowledge, edits, [bool(s) for s in saturated]
        self.rank_history = [list(r) for r in meta.get("rank_history", [])]
        self.knowledge_info = dict(meta.get("knowledge_text") or {})
        self._previous_update = [None] * len(self.layers)
        self.batches_applied = int(meta.get("batches_applied", 0))


def _add_update_hook(module: torch.nn.Module, factor: torch.Tensor, span: torch.Tensor | None) -> Any:
    """Add ``x K A^T`` (or ``x A^T`` for a full update) to W_out's output: the trainable update rides
    on top of the untouched weight, and is folded into the weight once the edit is done."""

    def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        coords = x @ span.to(x) if span is not None else x
        return output + coords @ factor.to(x).T

    return module.register_forward_hook(hook)


class OEditPlus(OEdit):
    """O-Edit+: hard projection of every update onto the complement of span(B_k ∪ B_e)."""

    name = "oedit-plus"
    config_class = OEditPlusConfig
