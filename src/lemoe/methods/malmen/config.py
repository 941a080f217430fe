"""MALMEN / MEND-sum options. One dataclass for both: they share the hyper-network and the cache;
only the aggregation (least squares vs sum) differs, and that is the method's identity, not an option."""

from __future__ import annotations

from dataclasses import dataclass

from lemoe.methods.base import MethodConfig


@dataclass
class MALMENConfig(MethodConfig):
    # Which weights: the MLP output projections of these blocks; None -> the last ``n_layers`` blocks.
    layers: list[int] | None = None
    n_layers: int = 4
    # Hyper-network (MEND-style residual blocks with a low-rank bottleneck).
    rank: int = 1920
    n_blocks: int = 2
    # Initial per-module step size eta. The paper's 1e-6 suits GPT-J's raw scales; on SmolLM2 with
    # standardised inputs an untrained net edits reliably from ~1e-3, so start a little below that.
    init_lr: float = 3e-4
    init_log_lambda: float = 0.0  # initial per-module log of the ridge lambda
    # Where a trained editor lives (a directory written by save_pretrained or the trainer); None: untrained.
    # Its layers / n_layers / rank / n_blocks replace the ones given here (the net must match its weights).
    editor: str | None = None
    # Compute sizes: they change speed and memory, never the result.
    lm_batch_size: int = 32  # edit sequences per LM forward/backward when caching
    net_batch_size: int = 1024  # cached tokens per hyper-network chunk
    cache_memory_mb: float = 1024.0  # above this the cache spills to disk under lemoe's cache dir
    # Meta-training (used by the trainer; kept here so a saved editor records how it was trained).
    meta_lr: float = 1e-4  # the paper's 1e-5 assumes an epoch of thousands of steps; ours is short
    meta_lr_scalars: float = 1e-4  # Adam lr of the per-module eta and log lambda (~1/3 of eta per step)
    loc_coef: float = 1.0
    max_grad_norm: float = 1.0
    edit_loss_on_prompts: bool = False  # also put the edit prompts themselves in the generalisation loss

    def __post_init__(self) -> None:
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ValueError(f"malmen: layers must be a non-empty list of block indices, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"malmen: layers has duplicates: {self.layers}")
            self.layers = [int(x) for x in self.layers]
        for name in ("n_layers", "rank", "n_blocks", "lm_batch_size", "net_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"malmen: {name} must be a positive integer, got {value!r}")
        for name in ("init_lr", "meta_lr", "meta_lr_scalars", "max_grad_norm", "cache_memory_mb"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"malmen: {name} must be > 0, got {getattr(self, name)!r}")
        if self.loc_coef < 0:
            raise ValueError(f"malmen: loc_coef must be >= 0, got {self.loc_coef!r}")
