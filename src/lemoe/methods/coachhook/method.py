"""COMEBA-HK / CoachHooK (Li et al., EMNLP 2024): consecutive batch editing in hook layers.

State per edited layer, constant in size: the hook weight ``W_h`` (kept as ``W_h - W_0``), the
accumulated key covariance ``C_accu`` (starts at ``λ C0``) and the threshold ``α``. One batch:

1. with validated hooks on (earlier edits active) compute the targets ``z`` at the last layer;
2. switch every hook to temporary;
3. for each layer from the bottom: keys ``K``, residual spread as in MEMIT,
   ``Δ = R Kᵀ (C_accu + K Kᵀ)⁻¹``, ``W_h += Δ``, ``C_accu += K Kᵀ``, hook becomes validated;
4. dynamic α: run the batch's prompts and set ``α ← min(α, min_i max_t z_it)`` per layer, so every
   edited prompt swaps at least one token in every layer (α never increases).

Options beyond the paper (see ``config.py``): ``scope_score="relative"`` judges a token by the
hook's change relative to the original output instead of a z-score over the sequence;
``scope_score="key"`` by how close its key is to an edited fact's key (whitened cosine; the edit
keys join the state), with ``scope_prompt_keys`` also by each edit prompt's own key;
``alpha_quantile`` replaces the minimum over the batch's prompts by a low quantile. The default is
the paper's rule; where locality matters most, ``scope_score="key"`` with ``scope_prompt_keys=True``
held it at or above 0.95 in lemoe's measurements on SmolLM2-135M, with ``alpha_quantile=0.3`` over
600 edits in batches of 30 and ``0.5`` over 1,000 in batches of 100 (a higher quantile narrows the
scope: more locality, a little less generality; docs/results.md, CoachHooK section).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch

from lemoe.batching import pad_id, pad_right
from lemoe.methods.base import StateError
from lemoe.methods.coachhook.config import CoachHooKConfig
from lemoe.methods.coachhook.hooks import HookLayer, MaskSource, Mode
from lemoe.methods.locate import (
    LocateEditMethod,
    block_outputs,
    compute_z,
    memit_delta,
    spread_residual,
    template_keys,
)
from lemoe.requests import EditRequest


class _Stop(Exception):
    pass


def _raise_stop(*_: Any) -> None:
    raise _Stop


class CoachHooK(LocateEditMethod):
    name = "coachhook"
    config_class = CoachHooKConfig

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: CoachHooKConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        cfg: CoachHooKConfig = self.config  # type: ignore[assignment]
        self.masks = MaskSource()
        self.hooks = [
            HookLayer(m, layer, cfg.alpha_init, self.masks, scoped=cfg.scope_rule, score=cfg.scope_score)  # type: ignore[arg-type]
            for layer, m in zip(self.layers, self.out_projs, strict=True)
        ]
        self.c_accu: dict[int, torch.Tensor] | None = None  # float64, on the model's device
        self._handles: list[Any] = []
        self.attach()

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks (done on construction; a no-op when already attached)."""
        if self._handles:
            return
        # The module holding the block list (Llama's model.model, OPT's model.decoder, GPT-2's
        # transformer) receives the attention mask on every path, however the model is called.
        stack = self.model.get_submodule(self.access.blocks_path.rsplit(".", 1)[0])
        self._handles.append(stack.register_forward_pre_hook(self.masks, with_kwargs=True))
        self._handles.extend(h.module.register_forward_hook(h) for h in self.hooks)

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what the unedited model computes."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def hooks_off(self) -> Iterator[None]:
        attached = bool(self._handles)
        self.detach()
        try:
            yield
        finally:
            if attached:
                self.attach()

    def _set_mode(self, mode: Mode, hooks: Sequence[HookLayer] | None = None) -> None:
        for h in hooks if hooks is not None else self.hooks:
            h.mode = mode

    @property
    def alphas(self) -> list[float]:
        return [h.alpha for h in self.hooks]

    # -- editing ---------------------------------------------------------------------------------
    def _ensure_c_accu(self) -> dict[int, torch.Tensor]:
        if self.c_accu is None:
            with self.hooks_off():  # C0 describes the unedited model
                mom2 = self.mom2()
            self.c_accu = {layer: self.mom2_weight(layer) * mom2[layer].clone() for layer in self.layers}
        return self.c_accu

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        with self.hooks_off():
            self.prepare()
        c_accu = self._ensure_c_accu()
        last = self.layers[-1]
        self._set_mode("validated")
        t0 = time.perf_counter()
        zs, info = compute_z(self.model, self.access, self.tokenizer, requests, last, self.cfg, self.z_templates())
        info["z_seconds"] = time.perf_counter() - t0
        self._set_mode("temporary")
        norms = []
        try:
            for i, (layer, hook) in enumerate(zip(self.layers, self.hooks, strict=True)):
                # one read serves both: the average is MEMIT's key, template 0 ("{}") the bare prompt's
                per_template = template_keys(self.access, self.tokenizer, layer, requests, self.key_templates())
                ks = per_template.mean(1)
                current = block_outputs(self.access, self.tokenizer, last, requests)
                resid = spread_residual(zs, current, len(self.layers) - i)
                delta = memit_delta(resid, ks, c_accu[layer])
                hook.delta += delta.to(hook.delta)
                hook.active = True
                if hook.score == "key":
                    bare = per_template[:, 0] if self.cfg.scope_prompt_keys else None  # type: ignore[attr-defined]
                    hook.add_keys(ks, self.mom2()[layer], bare)
                c_accu[layer] += ks.double().T @ ks.double()
                hook.mode = "validated"
                norms.append(float(delta.norm()))
        finally:
            self._set_mode("validated")
        if self.cfg.dynamic_alpha and self.cfg.scope_rule:  # type: ignore[attr-defined]
            self.update_alpha(requests)
        write_seconds = time.perf_counter() - t0 - info["z_seconds"]
        return {**self.take_info(), **info, "delta_norms": norms, "write_seconds": write_seconds, "alpha": self.alphas}

    @torch.no_grad()
    def prompt_max_z(self, requests: Sequence[EditRequest], upto: int | None = None) -> list[torch.Tensor]:
        """Per layer (up to hook index ``upto``), each prompt's largest token z-score (``-inf``
        where none is defined), with the thresholds as they are now."""
        hooks = self.hooks if upto is None else self.hooks[: upto + 1]
        for h in hooks:
            h.record = []
        stop = hooks[-1].module.register_forward_hook(_raise_stop)
        try:
            for i in range(0, len(requests), 32):
                chunk = requests[i : i + 32]
                enc = [self.tokenizer(r.prompt, add_special_tokens=True)["input_ids"] for r in chunk]  # type: ignore[operator]
                ids, mask = pad_right(enc, pad_id(self.tokenizer))
                with suppress(_Stop):
                    self.model(input_ids=ids.to(self.access.device), attention_mask=mask.to(self.access.device))
            return [torch.cat(h.record) if h.record else torch.empty(0) for h in hooks]  # type: ignore[arg-type]
        finally:
            stop.remove()
            for h in hooks:
                h.record = None

    def update_alpha(self, requests: Sequence[EditRequest]) -> None:
        """α_l ← min(α_l, min_i max_t z_it) over prompts where a z-score exists (never increases);
        with ``alpha_quantile`` q > 0 the q-quantile over prompts replaces the minimum.

        Layers are updated from the bottom: a lower α changes which tokens swap below, and so the
        z-scores above, so each layer is measured with the final thresholds of the layers below.
        """
        floor = self.cfg.alpha_floor  # type: ignore[attr-defined]
        q = float(self.cfg.alpha_quantile)  # type: ignore[attr-defined]
        for index, hook in enumerate(self.hooks):
            if not hook.active:
                continue
            zmax = self.prompt_max_z(requests, upto=index)[-1]
            defined = zmax[torch.isfinite(zmax)]
            if defined.numel() == 0:
                continue
            level = float(defined.min()) if q == 0.0 else float(torch.quantile(defined.double(), q))
            new = min(hook.alpha, level)
            hook.alpha = max(new, floor) if floor is not None else new

    def reset(self) -> None:
        for h in self.hooks:
            h.delta.zero_()
            h.keys = h.whiten = h.prompt_keys = None
            h.active = False
            h.mode = "validated"
            h.alpha = float(self.cfg.alpha_init)  # type: ignore[attr-defined]
        self.c_accu = None
        self.batches_applied = 0

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"delta.{h.layer}": h.delta.detach().cpu() for h in self.hooks}
        if self.c_accu is not None:
            state.update({f"c_accu.{layer}": c for layer, c in self.c_accu.items()})
        for h in self.hooks:
            if h.keys is not None and h.whiten is not None:
                state[f"keys.{h.layer}"] = h.keys.detach().cpu()
                state[f"whiten.{h.layer}"] = h.whiten.detach().cpu()
            if h.prompt_keys is not None:
                state[f"prompt_keys.{h.layer}"] = h.prompt_keys.detach().cpu()
        return state

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "alpha": self.alphas}

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._load_meta(meta)
        alphas = meta.get("alpha")
        if not isinstance(alphas, list) or len(alphas) != len(self.hooks):
            raise StateError(f"saved state has alpha {alphas!r}; expected one per layer {self.layers}")
        if not all(isinstance(a, (int, float)) and not math.isnan(a) for a in alphas):
            raise StateError(f"saved alpha values are not numbers: {alphas!r}")
        for h in self.hooks:
            delta = state.get(f"delta.{h.layer}")
            if delta is None or delta.shape != h.delta.shape:
                raise StateError(f"saved delta.{h.layer} is missing or has the wrong shape")
        has_c = [f"c_accu.{layer}" in state for layer in self.layers]
        if any(has_c) and not all(has_c):
            raise StateError("saved state holds C_accu for some layers only")
        for h in self.hooks:
            if h.score != "key" or not state[f"delta.{h.layer}"].any():
                continue
            keys, whiten = state.get(f"keys.{h.layer}"), state.get(f"whiten.{h.layer}")
            d_in = h.delta.shape[1]
            if (
                keys is None
                or whiten is None
                or keys.dim() != 2
                or keys.shape[1] != d_in
                or whiten.shape != (d_in, d_in)
            ):
                raise StateError(
                    f"scope_score='key' needs keys.{h.layer} [n, {d_in}] and whiten.{h.layer} in the state"
                )
            prompt_keys = state.get(f"prompt_keys.{h.layer}")
            if self.cfg.scope_prompt_keys and (prompt_keys is None or prompt_keys.shape != keys.shape):  # type: ignore[attr-defined]
                raise StateError(f"scope_prompt_keys needs prompt_keys.{h.layer} shaped like keys.{h.layer}")
        for h, a in zip(self.hooks, alphas, strict=True):
            h.delta.copy_(state[f"delta.{h.layer}"].to(h.delta))
            h.active = bool(h.delta.any())
            h.mode = "validated"
            h.alpha = float(a)
            keys, whiten = state.get(f"keys.{h.layer}"), state.get(f"whiten.{h.layer}")
            has_keys = h.score == "key" and keys is not None and whiten is not None
            h.keys = keys.to(h.delta) if has_keys else None
            h.whiten = whiten.to(h.delta) if has_keys else None
            prompt_keys = state.get(f"prompt_keys.{h.layer}")
            use_prompt = has_keys and prompt_keys is not None and self.cfg.scope_prompt_keys  # type: ignore[attr-defined]
            h.prompt_keys = prompt_keys.to(h.delta) if use_prompt else None
        self.c_accu = (
            {layer: state[f"c_accu.{layer}"].to(self.access.device, torch.float64) for layer in self.layers}
            if all(has_c)
            else None
        )
