"""Editing-order planning: cluster a known edit set so each batch (one expert) holds similar edits
and different batches hold different ones (LEMoE's clustering-based order planning).

K-means runs over the routing embeddings themselves, the space the router separates experts in.
For edits that arrive over time, :class:`StreamingPlanner` buffers them and plans each full buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """Spherical k-means (cosine) with k-means++ seeding; returns the cluster of each row."""
    n = x.shape[0]
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(x.float().cpu(), dim=-1)
    centers = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d = (1 - x @ torch.stack(centers).T).min(1).values.clamp(min=0)
        p = d / d.sum() if float(d.sum()) > 0 else torch.full((n,), 1.0 / n)
        centers.append(x[int(torch.multinomial(p, 1, generator=g))])
    c = torch.stack(centers)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = (x @ c.T).argmax(1)
        if _ > 0 and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return labels


def clustered_batches(items: Sequence[T], labels: torch.Tensor, batch_size: int) -> list[list[T]]:
    """Concatenate clusters (in order of first arrival, members in arrival order), then cut into
    batches of ``batch_size``: batches are within one cluster except where a cluster ends."""
    order: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        order.setdefault(lab, []).append(i)
    flat = [items[i] for members in order.values() for i in members]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def plan_clustered(items: Sequence[T], embeddings: torch.Tensor, batch_size: int, *, seed: int = 0) -> list[list[T]]:
    """K-means with ``ceil(n / batch_size)`` clusters, then :func:`clustered_batches`."""
    if batch_size <= 1 or len(items) <= batch_size:
        return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    labels = kmeans(embeddings, math.ceil(len(items) / batch_size), seed=seed)
    return clustered_batches(items, labels, batch_size)


class StreamingPlanner:
    """Order planning for edits that arrive over time: buffer ``buffer_size`` edits, plan them
    with ``plan`` (e.g. ``method.plan_batches``), release the full batches, keep a partial one."""

    def __init__(self, plan: Callable[[list[T], int], list[list[T]]], batch_size: int, buffer_size: int) -> None:
        if batch_size < 1 or buffer_size < batch_size:
            raise ValueError("need batch_size >= 1 and buffer_size >= batch_size")
        self.plan = plan
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.buffer: list[T] = []

    def add(self, item: T) -> list[list[T]]:
        """Buffer one edit; returns the batches ready to apply (often none)."""
        self.buffer.append(item)
        if len(self.buffer) < self.buffer_size:
            return []
        batches = self.plan(self.buffer, self.batch_size)
        ready = [b for b in batches if len(b) == self.batch_size]
        self.buffer = [x for b in batches if len(b) < self.batch_size for x in b]
        return ready

    def flush(self) -> list[list[T]]:
        """Plan and release whatever is buffered."""
        if not self.buffer:
            return []
        batches = self.plan(self.buffer, self.batch_size)
        self.buffer = []
        return batches
