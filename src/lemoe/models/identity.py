"""Which base model a saved state, store or cache belongs to.

A state edited onto one model must never load onto another, and two fine-tunes of the same
architecture differ only in their weights, so the identity covers **every** tensor: its name,
shape, dtype and ``SAMPLES`` values read at an even stride through it (every value of a smaller
tensor). Hashing all values would read the whole model on every load; a strided sample of each
tensor catches any fine-tune, merge or re-quantisation (they change nearly every value) at a cost of
milliseconds. What it cannot catch is a change confined to values between the samples of a tensor.

The fingerprint is taken of the model as it was before any edit (``EditMethod.base_fingerprint``):
methods that edit weights in place change the very values it reads.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

SCHEME = "strided-4096-v2"
SAMPLES = 4096
_CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "n_embd", "n_layer")


@torch.no_grad()
def tensor_sample(tensor: torch.Tensor, samples: int = SAMPLES) -> torch.Tensor:
    """``samples`` values at an even stride through ``tensor`` (all of them when it is smaller)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > samples:
        step = flat.numel() // samples
        flat = flat[: step * samples : step]
    return flat.float().cpu()


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The model's shape fields from its config and a hash over every tensor (see module doc)."""
    config = getattr(model, "config", None)
    cfg = config.to_dict() if config is not None else {}
    keep: dict[str, Any] = {k: cfg[k] for k in _CONFIG_FIELDS if cfg.get(k) is not None}
    h = hashlib.sha256()
    n = 0
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        h.update(tensor_sample(tensor).numpy().tobytes())
        n += 1
    keep.update(scheme=SCHEME, tensors=n, weights_sha256=h.hexdigest())
    return keep


def fingerprint_mismatch(saved: Any, current: dict[str, Any]) -> str | None:
    """Why a saved fingerprint does not name this model (``None`` when it does)."""
    if not isinstance(saved, dict):
        return "the saved model fingerprint is malformed"
    if saved.get("scheme") != current["scheme"]:
        return (
            f"it was saved with model fingerprint scheme {saved.get('scheme', 'v1 (a few tensors)')!r}, "
            f"this lemoe checks {current['scheme']!r}; re-create it from the base model"
        )
    if saved != current:
        return f"it was saved for another base model ({saved} vs {current})"
    return None
