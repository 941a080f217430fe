"""Append-only rows with spare capacity: adding one expert (or one batch of keys) copies the new
rows only, not every earlier one.

``torch.cat([old, new])`` on every batch copies the whole stack, so a stream of N batches moves
O(N²) bytes. A :class:`RowBuffer` holds a group of tensors (same number of rows) with room to
grow by a quarter; an append writes the new rows in place and hands out views ``buffer[:n]``.
Earlier views are never written (their rows are below the append point), so a state handed out
before stays exactly as it was: the copy-on-write promise LEMoE makes to the store and the
serving replicas. Only the holder of the newest views may append in place; anyone else (a
snapshot, a replica, a table changed by other means) gets a fresh buffer.
"""

from __future__ import annotations

import math

import torch

GROWTH = 1.25  # capacity after a reallocation: a quarter more than needed (amortised O(1) copies)
MIN_CAPACITY = 8


class RowBuffer:
    def __init__(self, current: dict[str, torch.Tensor], capacity: int) -> None:
        self.data: dict[str, torch.Tensor] = {}
        for name, t in current.items():
            buf = torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
            buf[: t.shape[0]] = t
            self.data[name] = buf
        self.filled = _rows(current)

    @property
    def capacity(self) -> int:
        return next(iter(self.data.values())).shape[0]

    def holds(self, current: dict[str, torch.Tensor]) -> bool:
        """Whether ``current`` are this buffer's newest views (so appending in place is safe)."""
        if set(current) != set(self.data):
            return False
        return all(
            t.shape == (self.filled, *self.data[k].shape[1:]) and t.data_ptr() == self.data[k].data_ptr()
            for k, t in current.items()
        )


def _rows(tensors: dict[str, torch.Tensor]) -> int:
    counts = {t.shape[0] for t in tensors.values()}
    if len(counts) != 1:
        raise ValueError(f"row groups must have one row count, got {sorted(counts)}")
    return counts.pop()


def append_rows(
    current: dict[str, torch.Tensor], new: dict[str, torch.Tensor], buffer: RowBuffer | None
) -> tuple[dict[str, torch.Tensor], RowBuffer]:
    """``current`` with ``new``'s rows appended (each converted to its tensor's dtype and device),
    as views of ``buffer`` (reused when it holds ``current`` and has room, else a new one)."""
    n, k = _rows(current), _rows(new)
    if buffer is None or not buffer.holds(current) or buffer.capacity < n + k:
        buffer = RowBuffer(current, max(MIN_CAPACITY, n + k, math.ceil(GROWTH * (n + k))))
    for name, t in new.items():
        buffer.data[name][n : n + k] = t.to(buffer.data[name])
    buffer.filled = n + k
    return {name: buf[: n + k] for name, buf in buffer.data.items()}, buffer
