"""Hook layers: edited copies of MLP output projections, applied by forward hooks.

The original projection always runs (``P = W_0 x``); the hook adds ``(W_h - W_0) x``, so
``O = W_h x`` without ever writing to ``W_0``. A **temporary** hook always uses ``O``. A
**validated** hook uses ``O`` only at "outlier" tokens: with ``M_t = ‖O_t − P_t‖`` over the real
(unpadded) tokens of a sequence, token ``t`` swaps when its z-score ``(M_t − mean M) / std M`` is at
least ``α``. A sequence of one token has no spread, so it never swaps (nor does a generation step
that feeds one new token; the edit acts on the prompt, whose keys reach later steps through the
KV cache). A hook built with ``scoped=False`` (the no-scope-rule ablation) always uses ``O``.
With ``score="relative"`` (an alternative to the paper's rule) token ``t`` swaps when
``‖O_t − P_t‖ / ‖P_t‖ ≥ α``: a per-token test that does not look at the rest of the sequence, so
teacher forcing and step-by-step generation decide alike and one-token inputs can swap.
With ``score="key"`` (a second alternative) token ``t`` swaps when its key ``x_t`` is close to the key
of an edited fact: the largest cosine between ``x_t`` and the stored edit keys, both whitened by the
unedited key covariance ``C0`` (``cos(L⁻¹x, L⁻¹k)`` with ``C0 = L Lᵀ``), is at least ``α``. It asks
*which* fact a token is about, not how much the summed hook weights change it, so it does not loosen
as edits accumulate. With prompt keys (``scope_prompt_keys``) each edit also stores the key its
own bare prompt produces; recorded scores (which set α) leave those out. Removing the hooks restores
the base model exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lemoe.models.access import weight_as_out_in

Mode = Literal["validated", "temporary"]
Score = Literal["zscore", "relative", "key"]


def zscores(m: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row z-scores of ``m`` over ``valid`` positions; ``-inf`` where undefined (one token,
    zero spread, or padding)."""
    validf = valid.to(m.dtype)
    n = validf.sum(-1, keepdim=True)
    mean = (m * validf).sum(-1, keepdim=True) / n.clamp(min=1)
    var = ((m - mean) ** 2 * validf).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt()
    ok = valid & (n > 1) & (std > 0)
    z = (m - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(ok, z, torch.full_like(z, float("-inf")))


def relative_change(m: torch.Tensor, base: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token ``m / ‖base‖`` (the hook's change relative to the projection's own output);
    ``-inf`` at padding."""
    ratio = m / base.float().norm(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(valid, ratio, torch.full_like(ratio, float("-inf")))


def whitening(mom2: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` with ``C0 = L Lᵀ`` (a tiny ridge keeps dead key units invertible), float32."""
    c = mom2.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    lower = torch.linalg.cholesky(c + (1e-6 * float(c.diagonal().mean()) + 1e-12) * eye)
    return torch.linalg.solve_triangular(lower, eye, upper=False).float()


def whitened_unit(x: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` whitened (``L⁻¹ x``) and scaled to unit length."""
    xw = x.float() @ whiten.T
    return xw / xw.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def key_similarity(
    x: torch.Tensor, whiten: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, more: torch.Tensor | None = None
) -> torch.Tensor:
    """Per token, the largest whitened cosine between its key and a stored (whitened, unit) edit key
    in ``keys`` or ``more``; ``-inf`` at padding."""
    xw = whitened_unit(x, whiten)
    sim = (xw @ keys.T).max(-1).values
    if more is not None:
        sim = torch.maximum(sim, (xw @ more.T).max(-1).values)
    return torch.where(valid, sim, torch.full_like(sim, float("-inf")))


class HookLayer:
    """One edited output projection: its weight change, mode and threshold."""

    def __init__(
        self,
        module: nn.Module,
        layer: int,
        alpha: float,
        masks: MaskSource,
        scoped: bool = True,
        score: Score = "zscore",
    ) -> None:
        w = weight_as_out_in(module)
        d_out, d_in = w.shape
        self.module = module
        self.layer = layer
        self.delta = torch.zeros(d_out, d_in, dtype=torch.float32, device=w.device)  # W_h - W_0
        self.active = False  # False while delta is zero: the hook returns the output untouched
        self.mode: Mode = "validated"
        self.alpha = float(alpha)
        self.masks = masks
        self.scoped = scoped  # False: validated behaves as temporary (no scope rule)
        self.score = score
        self.record: list[torch.Tensor] | None = None  # per-row max score, while recording
        self.whiten: torch.Tensor | None = None  # score="key": L⁻¹ of C0, [d_in, d_in]
        self.keys: torch.Tensor | None = None  # score="key": whitened unit keys of the edits, [n, d_in]
        # score="key" with prompt keys: the edits' keys as their bare prompts produce them, [n, d_in];
        # matched at use, left out of recorded scores (those set α against the averaged keys)
        self.prompt_keys: torch.Tensor | None = None

    def add_keys(self, keys: torch.Tensor, mom2: torch.Tensor, prompt_keys: torch.Tensor | None = None) -> None:
        """Remember a batch's edit keys (``score="key"``); ``mom2`` is the unedited ``C0``."""
        if self.whiten is None:
            self.whiten = whitening(mom2).to(self.delta.device)
        unit = whitened_unit(keys.to(self.delta.device), self.whiten)
        self.keys = unit if self.keys is None else torch.cat([self.keys, unit])
        if prompt_keys is not None:
            unit = whitened_unit(prompt_keys.to(self.delta.device), self.whiten)
            self.prompt_keys = unit if self.prompt_keys is None else torch.cat([self.prompt_keys, unit])

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not self.active:
            return None
        x = args[0]
        diff = x @ self.delta.to(x.dtype).T  # O - P
        if self.mode == "temporary" or not self.scoped:
            return output + diff
        flat = diff.dim() == 2  # OPT runs its MLP on tokens flattened to [B*T, d]
        d3 = diff.reshape(self.masks.rows(diff.shape[0]), -1, diff.shape[-1]) if flat else diff
        valid = self.masks.valid(d3.shape[:2], d3.device)
        if self.score == "key":  # keys and L⁻¹ live on the hook's device (add_keys / load_state_dict)
            if self.keys is None or self.whiten is None:
                return None  # no edit keys yet: nothing is in scope
            more = self.prompt_keys if self.record is None else None  # recording sets α: averaged keys only
            z = key_similarity(x.reshape(*d3.shape[:2], -1), self.whiten, self.keys, valid, more)
        else:
            m = d3.float().norm(dim=-1)  # [B, T]
            if self.score == "zscore":
                z = zscores(m, valid)
            else:
                z = relative_change(m, output.reshape(d3.shape) if flat else output, valid)
        if self.record is not None:
            self.record.append(z.max(-1).values.detach().cpu())
        swap = (torch.isfinite(z) & (z >= self.alpha)).unsqueeze(-1).to(diff.dtype)  # undefined z: never
        return output + (d3 * swap).reshape(diff.shape)


class MaskSource:
    """Remembers the attention mask of the current forward pass (a pre-hook on the base model),
    so hooks can ignore padding when they compute z-scores."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.batch = 1  # sequences in the current forward

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        self.batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else 1

    def rows(self, n_tokens: int) -> int:
        """Sequences in a flattened ``[B*T]`` token batch."""
        return self.batch if n_tokens % self.batch == 0 else 1

    def valid(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        b, t = shape
        mask = self.mask
        if mask is not None and mask.shape[0] == b and mask.shape[1] >= t:
            return mask[:, -t:].to(device).bool()  # with a KV cache the mask also covers earlier tokens
        return torch.ones((b, t), dtype=torch.bool, device=device)
