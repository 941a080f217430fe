"""The LM side of MALMEN: keys and value-gradients at answer-token positions, cached per layer.

For every token position that predicts an answer token, each edited layer contributes its input
``u`` (the key) and the gradient of the edit's fine-tuning loss with respect to its output
``∇_v L``. The loss is the *sum* of the answer tokens' NLL, so each token's gradient is the same
whichever other edits share its LM batch: the cache, and so the shift, do not depend on the batch
split. The cache is a list of pieces per layer, kept in memory up to a budget and spilled to disk
beyond it; :meth:`KeyGradCache.chunks` re-cuts the pieces into hyper-network chunks of any size,
so the LM batch size and the hyper-network batch size are independent (no count mismatch).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lemoe.methods.training import LMBatch, build_lm_batch
from lemoe.models.access import ModelAccess


class KeyGradCache:
    """Per-layer (keys, value-gradients) pieces, in memory up to ``memory_mb`` then on disk."""

    def __init__(self, n_slots: int, *, memory_mb: float = 1024.0, spill_root: Path | None = None) -> None:
        self.pieces: list[list[tuple[torch.Tensor, torch.Tensor] | tuple[Path, int]]] = [[] for _ in range(n_slots)]
        self.memory_bytes = int(memory_mb * 2**20)
        self.bytes_in_memory = 0
        self.spill_root = spill_root
        self._spill_dir: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._n_files = 0

    @property
    def spilled(self) -> bool:
        return self._spill_dir is not None

    def add(self, slot: int, keys: torch.Tensor, grads: torch.Tensor) -> None:
        keys = keys.detach().to("cpu", torch.float32).contiguous()
        grads = grads.detach().to("cpu", torch.float32).contiguous()
        if keys.shape[0] != grads.shape[0]:
            raise ValueError(f"cache: {keys.shape[0]} keys but {grads.shape[0]} gradients")
        size = keys.numel() * 4 + grads.numel() * 4
        if self.bytes_in_memory + size <= self.memory_bytes:
            self.pieces[slot].append((keys, grads))
            self.bytes_in_memory += size
            return
        path = self._spill_path()
        save_file({"keys": keys, "grads": grads}, str(path))
        self.pieces[slot].append((path, keys.shape[0]))

    def _spill_path(self) -> Path:
        if self._spill_dir is None:
            root = self.spill_root
            if root is None:
                from lemoe.models import cache_dir

                root = cache_dir() / "malmen-cache"
            root.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=root))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        self._n_files += 1
        return self._spill_dir / f"{self._n_files:06d}.safetensors"

    def _load(self, piece: tuple[torch.Tensor, torch.Tensor] | tuple[Path, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(piece[0], Path):
            data = load_file(str(piece[0]))
            return data["keys"], data["grads"]
        return piece  # type: ignore[return-value]

    def n_tokens(self, slot: int) -> int:
        return sum(p[0].shape[0] if isinstance(p[0], torch.Tensor) else int(p[1]) for p in self.pieces[slot])

    def chunks(self, slot: int, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The slot's rows in order, re-cut into chunks of exactly ``size`` rows (the last may be short)."""
        buf_k: list[torch.Tensor] = []
        buf_g: list[torch.Tensor] = []
        held = 0
        for piece in self.pieces[slot]:
            keys, grads = self._load(piece)
            start = 0
            while start < keys.shape[0]:
                take = min(size - held, keys.shape[0] - start)
                buf_k.append(keys[start : start + take])
                buf_g.append(grads[start : start + take])
                held += take
                start += take
                if held == size:
                    yield torch.cat(buf_k), torch.cat(buf_g)
                    buf_k, buf_g, held = [], [], 0
        if held:
            yield torch.cat(buf_k), torch.cat(buf_g)

    def gram(self, slot: int, size: int = 4096) -> torch.Tensor:
        """``KᵀK`` of the slot's keys in float64, streamed."""
        total: torch.Tensor | None = None
        for keys, _ in self.chunks(slot, size):
            k = keys.to(torch.float64)
            total = k.T @ k if total is None else total + k.T @ k
        if total is None:
            raise ValueError("cache: no tokens cached")
        return total

    def close(self) -> None:
        """Drop everything; remove the spill folder."""
        self.pieces = [[] for _ in self.pieces]
        self.bytes_in_memory = 0
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
            self._spill_dir = None

    def __enter__(self) -> KeyGradCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def answer_positions(batch: LMBatch) -> torch.Tensor:
    """Positions whose next-token prediction is an answer token ([B, T] bool)."""
    pred = torch.zeros_like(batch.target_mask)
    pred[:, :-1] = batch.target_mask[:, 1:]
    return pred


def answer_nll_sum(logits: torch.Tensor, batch: LMBatch) -> torch.Tensor:
    """Sum over answer tokens of their NLL (sum, not mean: per-token gradients ignore batching)."""
    pred = answer_positions(batch)
    labels = batch.input_ids[:, 1:][batch.target_mask[:, 1:]]
    return F.cross_entropy(logits[pred].float(), labels, reduction="sum")


def collect(
    model: torch.nn.Module,
    access: ModelAccess,
    layers: Sequence[int],
    tokenizer: object,
    prompts: Sequence[str],
    targets: Sequence[str],
    cache: KeyGradCache,
    *,
    lm_batch_size: int,
) -> float:
    """Run the edits through the model ``lm_batch_size`` at a time and fill ``cache`` (slot i =
    ``layers[i]``). Returns the summed fine-tuning loss (a diagnostic)."""
    total = 0.0
    for start in range(0, len(prompts), lm_batch_size):
        stop = start + lm_batch_size
        batch = build_lm_batch(tokenizer, prompts[start:stop], targets[start:stop]).to(access.device)
        total += collect_batch(model, access, layers, batch, cache)
    return total


def collect_batch(
    model: torch.nn.Module, access: ModelAccess, layers: Sequence[int], batch: LMBatch, cache: KeyGradCache
) -> float:
    """One LM forward/backward: append this batch's answer-token keys and value-gradients."""
    pred = answer_positions(batch)
    keys: list[torch.Tensor | None] = [None] * len(layers)
    probes: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(slot: int) -> Callable[..., torch.Tensor]:
        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            keys[slot] = args[0].detach()[pred]
            # A zero that requires grad: its gradient is ∂L/∂v, and the graph above stays whole.
            probe = torch.zeros_like(out, requires_grad=True)
            probes[slot] = probe
            return out + probe

        return hook

    handles = [access.mlp(layer).out_proj.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            if any(p is None for p in probes):
                raise RuntimeError("malmen: an edited layer's output projection was not called in the forward")
            loss = answer_nll_sum(logits, batch)
            grads = torch.autograd.grad(loss, probes)  # type: ignore[arg-type]
    finally:
        for h in handles:
            h.remove()
    for slot, (k, g) in enumerate(zip(keys, grads, strict=True)):
        cache.add(slot, k, g[pred])  # type: ignore[arg-type]
    return float(loss.detach())
