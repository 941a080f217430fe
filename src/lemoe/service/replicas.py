"""Serving copies of the edited model, so generation never waits for (or sees half of) an edit.

The writer edits its own model. After each change it *publishes* the method state into the standby
replica (``reset`` + ``load_state_dict``: the public interface every method has) and swaps it in.
Readers hold a replica's lock while they generate, so a replica is never loaded while in use and
forward-time method state (e.g. LEMoE's routing mask) is never shared by two requests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lemoe.evaluation.scorers import greedy_generate
from lemoe.methods.base import EditMethod


@dataclass
class Replica:
    method: EditMethod
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0


class ServingReplicas:
    """Two method replicas on their own base-model copies: one active, one being refreshed."""

    def __init__(self, make_method: Callable[[], EditMethod]) -> None:
        self._replicas = [Replica(make_method()), Replica(make_method())]
        self._active = 0
        self._swap = threading.Lock()

    def publish(self, state: dict[str, torch.Tensor], meta: dict[str, Any], version: int) -> None:
        """Load a new state into the standby replica, then make it the active one."""
        with self._swap:
            standby = self._replicas[1 - self._active]
        with standby.lock:  # waits for a reader that took it while it was active
            standby.method.reset()
            standby.method.load_state_dict({k: v.clone() for k, v in state.items()}, meta)
            standby.version = version
        with self._swap:
            self._active = self._replicas.index(standby)

    def generate(self, prompt: str, max_new_tokens: int) -> tuple[str, int]:
        """Greedy continuation of ``prompt`` with the newest published state; returns (text, version)."""
        with self._swap:
            replica = self._replicas[self._active]
        with replica.lock, torch.no_grad():
            method = replica.method
            ids = method.tokenizer(prompt, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
            new = greedy_generate(
                method.model, method.tokenizer, [ids], [max_new_tokens], context=method.forward_context
            )
            text = method.tokenizer.decode(new[0], skip_special_tokens=True)  # type: ignore[attr-defined]
            return text, replica.version
