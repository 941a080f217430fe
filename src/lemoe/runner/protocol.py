"""Lifelong editing protocols as data: how many edits, how many per step, when to evaluate.

``Protocol(edits=N, edits_per_step=B, evaluate="final")`` is the WISE/AlphaEdit protocol: N edits
as N/B sequential steps, the final model evaluated on all N. ``evaluate="every:K"`` also evaluates
all edits so far every K steps (CoachHooK's schedule); ``"immediate"`` scores each step's edits
right after that step (overstates retention; never the headline). ``chunk=T`` splits the N edits
into N/T independent runs from the unedited model (WISE's T < total) and averages them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lemoe.requests import EditRequest

Order = Literal["given", "shuffle"]


@dataclass(frozen=True)
class Protocol:
    edits: int
    edits_per_step: int = 1
    evaluate: str = "final"  # final | every:K | immediate
    chunk: int | None = None  # T: independent runs of T edits each; None: one run of all edits
    order: Order = "given"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.edits < 1:
            raise ValueError("edits must be at least 1")
        if self.edits_per_step < 1:
            raise ValueError("edits_per_step must be at least 1")
        _ = self.every  # validates the evaluate string
        if self.chunk is not None and (self.chunk < 1 or self.chunk > self.edits):
            raise ValueError(f"chunk must be between 1 and edits ({self.edits})")

    @property
    def every(self) -> int | None:
        """K for ``every:K``; None for final/immediate."""
        if self.evaluate in ("final", "immediate"):
            return None
        kind, _, k = self.evaluate.partition(":")
        if kind != "every" or not k.isdigit() or int(k) < 1:
            raise ValueError(f"evaluate must be final, immediate or every:K, got {self.evaluate!r}")
        return int(k)

    def order_requests(self, requests: list[EditRequest]) -> list[EditRequest]:
        if len(requests) < self.edits:
            raise ValueError(f"protocol asks for {self.edits} edits but the data holds {len(requests)}")
        chosen = list(requests)
        if self.order == "shuffle":
            random.Random(self.seed).shuffle(chosen)
        return chosen[: self.edits]

    def chunks(self, requests: list[EditRequest]) -> list[list[EditRequest]]:
        size = self.chunk or len(requests)
        return [requests[i : i + size] for i in range(0, len(requests), size)]

    def steps(self, chunk: list[EditRequest]) -> list[list[EditRequest]]:
        b = self.edits_per_step
        return [chunk[i : i + b] for i in range(0, len(chunk), b)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
