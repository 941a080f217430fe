"""MALMEN (least-squares aggregation) and MEND-sum (same hyper-network, shifts summed).

An edit batch is handled in three separate passes, so each runs with its own batch size:

1. LM pass (:func:`cache.collect`): keys and value-gradients of the answer tokens, per layer;
2. hyper-network pass: per token, the wanted change of the layer output ``d = -eta (u·ũ) g̃``;
3. aggregation per layer: ``S = (KᵀK + λI)⁻¹ KᵀD`` (float64), then ``W ← W + Sᵀ``.

Batches applied one after another edit the current weights (lifelong use); ``reset`` restores the
saved originals exactly. The hyper-network itself is the trained *editor*: the trainer
(``lemoe train-editor``) writes it with ``save_pretrained``, and a method built
with ``editor=DIR`` loads it (``load_method(DIR)`` works too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from lemoe.methods.base import EditMethod, StateError, read_state_meta
from lemoe.methods.malmen.cache import KeyGradCache, collect
from lemoe.methods.malmen.config import MALMENConfig
from lemoe.methods.malmen.net import HyperNet
from lemoe.methods.malmen.solve import diff_grads, factorise, shift_backward, solve_shift
from lemoe.models.access import weight_as_out_in
from lemoe.models.identity import fingerprint_mismatch, model_fingerprint
from lemoe.requests import EditRequest

# Options that fix the hyper-network's architecture: taken from a trained editor when one is loaded.
ARCH_OPTIONS = ("layers", "n_layers", "rank", "n_blocks")


@dataclass
class Shifts:
    """Per edited layer: the shift ``S`` [d_in, d_out] (float64) and, for least squares, the
    Cholesky factor of ``KᵀK + λI`` (reused by the meta-gradient)."""

    shifts: list[torch.Tensor]
    factors: list[torch.Tensor | None]
    n_tokens: int


def _net_key(key_size: int, value_size: int) -> str:
    return f"{key_size}x{value_size}"


class MALMEN(EditMethod):
    name = "malmen"
    config_class = MALMENConfig
    aggregation: ClassVar[str] = "lstsq"

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: MALMENConfig | None = None) -> None:
        config = config if config is not None else MALMENConfig()
        editor_meta = None
        if isinstance(config, MALMENConfig) and config.editor:
            editor_meta = read_editor_meta(config.editor, model_fingerprint(model))
            saved = editor_meta["config"]
            config = config.replace(**{k: saved[k] for k in ARCH_OPTIONS if k in saved})  # type: ignore[assignment]
        super().__init__(model, tokenizer, config)
        cfg: MALMENConfig = self.config  # type: ignore[assignment]
        n = self.access.num_layers
        layers = cfg.layers if cfg.layers is not None else list(range(max(0, n - cfg.n_layers), n))
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(f"{self.name}: layer {layer} out of range for a {n}-layer model")
        self.layers = sorted({layer % n for layer in layers})
        if len(self.layers) != len(layers):
            raise ValueError(f"{self.name}: layers {layers} name the same block twice")
        parts = [self.access.mlp(layer) for layer in self.layers]
        self.projections = [p.out_proj for p in parts]
        self.layouts = [p.layout for p in parts]
        self.originals = [p.out_proj.weight.detach().clone() for p in parts]
        # One net per weight shape; ``slots[i]`` = (net key, module index inside that net).
        counts: dict[str, int] = {}
        self.slots: list[tuple[str, int]] = []
        sizes: dict[str, tuple[int, int]] = {}
        for proj in self.projections:
            out_size, in_size = weight_as_out_in(proj).shape
            key = _net_key(in_size, out_size)
            sizes[key] = (in_size, out_size)
            self.slots.append((key, counts.get(key, 0)))
            counts[key] = counts.get(key, 0) + 1
        self.net = nn.ModuleDict(
            {
                key: HyperNet(
                    *sizes[key],
                    counts[key],
                    rank=cfg.rank,
                    n_blocks=cfg.n_blocks,
                    init_lr=cfg.init_lr,
                    init_log_lambda=cfg.init_log_lambda,
                )
                for key in sizes
            }
        ).to(self.access.device)
        self.net.requires_grad_(False)  # the trainer turns gradients on; editing never needs them
        if editor_meta is not None:
            self.load_editor(cfg.editor)  # type: ignore[arg-type]

    # -- the three passes ------------------------------------------------------------------------
    def build_cache(self, requests: list[EditRequest], *, update_norm: bool = False) -> KeyGradCache:
        """LM pass: keys and value-gradients of the answer tokens for every edited layer."""
        cfg: MALMENConfig = self.config  # type: ignore[assignment]
        cache = KeyGradCache(len(self.layers), memory_mb=cfg.cache_memory_mb)
        try:
            collect(
                self.model,
                self.access,
                self.layers,
                self.tokenizer,
                [r.prompt for r in requests],
                [r.target_new for r in requests],
                cache,
                lm_batch_size=cfg.lm_batch_size,
            )
            if update_norm:
                for slot, (key, _) in enumerate(self.slots):
                    for keys, grads in cache.chunks(slot, cfg.net_batch_size):
                        self.net[key].norm.update(torch.cat([keys, grads], -1))
        except BaseException:
            cache.close()
            raise
        return cache

    def _net(self, slot: int) -> tuple[HyperNet, int]:
        key, module = self.slots[slot]
        return self.net[key], module  # type: ignore[return-value]

    @torch.no_grad()
    def predict_shifts(self, cache: KeyGradCache) -> Shifts:
        """Hyper-network pass and aggregation: one shift per edited layer."""
        cfg: MALMENConfig = self.config  # type: ignore[assignment]
        device = self.access.device
        shifts: list[torch.Tensor] = []
        factors: list[torch.Tensor | None] = []
        for slot in range(len(self.layers)):
            net, m = self._net(slot)
            if self.aggregation == "sum":
                total = torch.zeros(net.key_size, net.value_size, dtype=torch.float64, device=device)
                for keys, grads in cache.chunks(slot, cfg.net_batch_size):
                    total += net.rank_one_sum(keys.to(device), grads.to(device), m).double()
                shifts.append(total)
                factors.append(None)
                continue
            gram = torch.zeros(net.key_size, net.key_size, dtype=torch.float64, device=device)
            kd = torch.zeros(net.key_size, net.value_size, dtype=torch.float64, device=device)
            for keys, grads in cache.chunks(slot, cfg.net_batch_size):
                keys, grads = keys.to(device), grads.to(device)
                diffs = net.value_diffs(keys, grads, m)
                k64 = keys.double()
                gram += k64.T @ k64
                kd += k64.T @ diffs.double()
            factor = factorise(gram, net.log_lambda[m].double().exp())
            shifts.append(solve_shift(factor, kd))
            factors.append(factor)
        return Shifts(shifts, factors, cache.n_tokens(0))

    def backward_shifts(self, cache: KeyGradCache, shifts: Shifts, grad_shifts: list[torch.Tensor]) -> None:
        """Meta-gradient: from ``G = ∂L/∂S`` per layer into the hyper-network's ``.grad``.

        Least squares: ``∂L/∂D = K (KᵀK+λI)⁻¹ G`` and ``∂L/∂λ`` in closed form, then the net is
        re-run chunk by chunk on the proxy loss ``Σ_j ⟨∂L/∂d_j, d_j⟩`` (same gradient, bounded
        memory). Sum: the proxy is ``⟨G, S_chunk⟩``.
        """
        cfg: MALMENConfig = self.config  # type: ignore[assignment]
        device = self.access.device
        with torch.enable_grad():
            for slot in range(len(self.layers)):
                net, m = self._net(slot)
                grad = grad_shifts[slot].to(device)
                if self.aggregation == "sum":
                    for keys, grads in cache.chunks(slot, cfg.net_batch_size):
                        part = net.rank_one_sum(keys.to(device), grads.to(device), m)
                        (part * grad.to(part.dtype)).sum().backward()
                    continue
                lam = net.log_lambda[m].detach().double().exp()
                solved, grad_lam = shift_backward(shifts.factors[slot], shifts.shifts[slot], grad)  # type: ignore[arg-type]
                (net.log_lambda[m] * float(grad_lam * lam)).backward()  # ∂L/∂logλ = λ ∂L/∂λ
                for keys, grads in cache.chunks(slot, cfg.net_batch_size):
                    keys, grads = keys.to(device), grads.to(device)
                    diffs = net.value_diffs(keys, grads, m)
                    (diff_grads(keys, solved).to(diffs.dtype) * diffs).sum().backward()

    # -- weights ---------------------------------------------------------------------------------
    def _as_weight(self, slot: int, shift: torch.Tensor) -> torch.Tensor:
        """``S`` [d_in, d_out] in the projection's own weight layout and dtype."""
        w = self.projections[slot].weight
        return (shift.T if self.layouts[slot] == "linear" else shift).to(w.dtype)

    @torch.no_grad()
    def add_shifts(self, shifts: Shifts) -> None:
        for slot, shift in enumerate(shifts.shifts):
            self.projections[slot].weight.add_(self._as_weight(slot, shift))

    @torch.no_grad()
    def set_shifts(self, shifts: Shifts | None) -> None:
        """Weights = originals (+ shifts): meta-training edits from the unedited model each step."""
        for slot, proj in enumerate(self.projections):
            proj.weight.copy_(self.originals[slot])
            if shifts is not None:
                proj.weight.add_(self._as_weight(slot, shifts.shifts[slot]))

    def weight_grads_as_shift(self) -> list[torch.Tensor]:
        """``∂L/∂S`` per layer from the projections' ``.grad`` (float32, [d_in, d_out])."""
        out = []
        for slot, proj in enumerate(self.projections):
            if proj.weight.grad is None:
                raise RuntimeError(f"{self.name}: no gradient reached layer {self.layers[slot]}")
            g = proj.weight.grad.float()
            out.append(g.T if self.layouts[slot] == "linear" else g)
        return out

    # -- EditMethod ------------------------------------------------------------------------------
    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        with self.build_cache(requests) as cache:
            spilled = cache.spilled
            shifts = self.predict_shifts(cache)
        self.add_shifts(shifts)
        return {
            "tokens": shifts.n_tokens,
            "spilled_to_disk": spilled,
            "shift_norm": [float(s.norm()) for s in shifts.shifts],
        }

    def reset(self) -> None:
        self.set_shifts(None)
        self.batches_applied = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        if self.batches_applied:
            for layer, proj, orig in zip(self.layers, self.projections, self.originals, strict=True):
                state[f"delta.{layer}"] = proj.weight.detach() - orig
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._load_net(state, "state")
        deltas = {k: v for k, v in state.items() if k.startswith("delta.")}
        expected = {f"delta.{layer}" for layer in self.layers}
        if deltas and set(deltas) != expected:
            raise StateError(f"{self.name}: state has weight deltas {sorted(deltas)}, expected {sorted(expected)}")
        for slot, layer in enumerate(self.layers):
            if f"delta.{layer}" in deltas and deltas[f"delta.{layer}"].shape != self.originals[slot].shape:
                raise StateError(f"{self.name}: delta.{layer} has the wrong shape")
        with torch.no_grad():
            for slot, layer in enumerate(self.layers):
                weight = self.originals[slot]
                if f"delta.{layer}" in deltas:
                    weight = weight + deltas[f"delta.{layer}"].to(weight)
                self.projections[slot].weight.copy_(weight)
        self.batches_applied = int(meta.get("batches_applied", 0)) if deltas else 0

    def _load_net(self, state: dict[str, torch.Tensor], where: str) -> None:
        own = self.net.state_dict()
        got = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
        if set(got) != set(own):
            missing, extra = sorted(set(own) - set(got)), sorted(set(got) - set(own))
            raise StateError(
                f"{self.name}: {where} does not match this hyper-network (missing {missing}, extra {extra})"
            )
        for k, v in got.items():
            if v.shape != own[k].shape:
                raise StateError(
                    f"{self.name}: {where} tensor net.{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise StateError(f"{self.name}: {where} tensor net.{k} holds non-finite values")
        self.net.load_state_dict({k: v.to(own[k]) for k, v in got.items()})

    def load_editor(self, directory: str | Path) -> None:
        """Load only the trained hyper-network from a saved state (its weight deltas are ignored)."""
        read_editor_meta(directory, self.base_fingerprint)
        try:
            state = load_file(str(Path(directory) / "state.safetensors"))
        except Exception as e:  # safetensors raises several error types on corrupt files
            raise StateError(f"{directory}: cannot read editor ({e})") from None
        self._load_net(state, f"editor {directory}")

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: torch.nn.Module, tokenizer: object) -> MALMEN:
        """As the base class, but the saved state carries the hyper-network itself, so the editor
        directory named in its config is not read again (it may have moved)."""
        meta = read_state_meta(directory)
        if meta["method"] != cls.name:
            raise StateError(f"{directory}: state was saved by method {meta['method']!r}, not {cls.name!r}")
        mismatch = fingerprint_mismatch(meta["model"], model_fingerprint(model))
        if mismatch:
            raise StateError(f"{directory}: cannot load onto this model: {mismatch}")
        config = cls.config_class.from_dict(meta["config"])
        method = cls(model, tokenizer, config.replace(editor=None))
        method.config = config
        try:
            state = load_file(str(Path(directory) / "state.safetensors"))
        except Exception as e:  # safetensors raises several error types on corrupt files
            raise StateError(f"{directory}: cannot read state ({e})") from None
        method.load_state_dict(state, meta["meta"])
        return method


class MENDSum(MALMEN):
    """MEND-style aggregation: the same hyper-network, rank-one shifts summed over tokens."""

    name = "mend-sum"
    aggregation = "sum"


def read_editor_meta(directory: str | Path, base_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Verify that ``directory`` holds a MALMEN/MEND-sum editor for the base model of this fingerprint."""
    meta = read_state_meta(directory)
    if meta["method"] not in (MALMEN.name, MENDSum.name):
        raise StateError(f"{directory}: holds a {meta['method']!r} state, not a malmen/mend-sum editor")
    mismatch = fingerprint_mismatch(meta["model"], base_fingerprint)
    if mismatch:
        raise StateError(f"{directory}: editor does not fit this model: {mismatch}")
    return meta
