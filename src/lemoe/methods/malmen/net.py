"""The hyper-network: maps one cached token's (key, value-gradient) to a pseudo key and gradient.

MEND's design as MALMEN uses it: the concatenation ``[u; g]`` is standardised by running
statistics (the raw gradients are tiny and the keys large, so without this nothing trains), then
passes through residual blocks ``h + scale[m] * relu(h A B + b) + shift[m]``. ``B`` starts at zero,
so an untrained net is the identity on standardised inputs, and the edit starts as a plain scaled
gradient step. One net serves every edited layer of the same weight shape; the per-module
embeddings (``scale``, ``shift``, the step size ``eta`` and ``log lambda``) tell the layers apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Standardise by a running mean/std (Chan's parallel update, float64 so long runs stay exact).

    Statistics only move when :meth:`update` is called (meta-training); editing uses them frozen,
    so the shifts do not depend on how edits are batched.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(self.mean.device, torch.float64).reshape(-1, self.mean.numel())  # the cache may be on CPU
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2_b + delta**2 * (self.count * n / total)
        self.count.fill_(total)

    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt().clamp(min=1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std().to(x.dtype)


class ResidualBlock(nn.Module):
    """``h + scale[m] * relu(h A B + b) + shift[m]`` with a rank-``rank`` bottleneck A B."""

    def __init__(self, size: int, rank: int, n_modules: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(size, rank) / math.sqrt(size))
        self.b = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, h: torch.Tensor, module: int) -> torch.Tensor:
        z = torch.relu(h @ self.a @ self.b + self.bias)
        return h + self.scale[module] * z + self.shift[module]


class HyperNet(nn.Module):
    """One net per weight shape ``(key_size, value_size)`` shared by ``n_modules`` layers."""

    def __init__(
        self,
        key_size: int,
        value_size: int,
        n_modules: int,
        *,
        rank: int,
        n_blocks: int,
        init_lr: float,
        init_log_lambda: float,
    ) -> None:
        super().__init__()
        self.key_size, self.value_size, self.n_modules = key_size, value_size, n_modules
        size = key_size + value_size
        self.norm = RunningNorm(size)
        self.blocks = nn.ModuleList(ResidualBlock(size, min(rank, size), n_modules) for _ in range(n_blocks))
        self.lr = nn.Parameter(torch.full((n_modules,), float(init_lr)))
        self.log_lambda = nn.Parameter(torch.full((n_modules,), float(init_log_lambda)))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, module: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo keys ``ũ`` [n, key_size] and pseudo value-gradients ``g̃`` [n, value_size]."""
        h = self.norm(torch.cat([keys, grads], dim=-1))
        for block in self.blocks:
            h = block(h, module)
        return h.split([self.key_size, self.value_size], dim=-1)

    def value_diffs(self, keys: torch.Tensor, grads: torch.Tensor, module: int) -> torch.Tensor:
        """MALMEN's per-token target change of the layer output: ``d = -eta (u · ũ) g̃``."""
        pk, pg = self(keys, grads, module)
        return -self.lr[module] * (keys * pk).sum(-1, keepdim=True) * pg

    def rank_one_sum(self, keys: torch.Tensor, grads: torch.Tensor, module: int) -> torch.Tensor:
        """MEND's shift for these tokens: ``-eta Σ ũ g̃ᵀ`` [key_size, value_size]."""
        pk, pg = self(keys, grads, module)
        return -self.lr[module] * pk.T @ pg
