"""Serving copies of the edited model, so generation never waits for (or sees half of) an edit.

The writer edits its own model. After each change it *publishes* the method state into the standby
replica (``reset`` + ``load_state_dict``: the public interface every method has) and swaps it in.
Readers hold a replica's lock while they generate, so a replica is never loaded while in use and
forward-time method state (e.g. LEMoE's routing mask) is never shared by two requests.

What a publish costs does not grow with the number of edits: each replica remembers, per state
key, which writer tensor (object and ``_version``) it was last given. A key whose tensor is
unchanged is handed the replica's own previous copy again; a changed key is copied -- or, for a
method whose state is copy-on-write (``state_copy_on_write``: LEMoE, whose every change binds new
tensors), shared with the writer without copying at all. The reload itself is by reference, so a
rollback or any other non-append change needs no special path (it just changes more keys).

Base weights: for a method that never writes them (``edits_base_weights = False``: LEMoE's hooks),
:func:`shared_base_copy` gives each replica its own module tree (own hooks, own train/eval flags)
over the writer's parameter tensors, so ``serve`` holds one copy of the base model, not three.
Methods that edit weights in place (FT-M, MEMIT, ...) keep separate copies.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lemoe.evaluation.scorers import greedy_generate
from lemoe.methods.base import EditMethod
from lemoe.service.generation import decode_batch


@dataclass
class Replica:
    method: EditMethod
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0
    # key -> (weakref to the writer's tensor, its _version, the tensor given, that one's _version)
    given: dict[str, tuple[Any, int, torch.Tensor, int]] = field(default_factory=dict)


def shared_base_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers *are* ``model``'s tensors.

    Hooks are not copied (the copy starts with none: a method attached to ``model`` stays there
    alone). Only for methods that never write the base weights (``edits_base_weights = False``)."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():
        for name, value in vars(module).items():
            if "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


def replica_factory(store: Any, device: str = "cpu", share_base: bool | None = None) -> Callable[[], EditMethod]:
    """What ``serve`` builds its replicas with: the store's method on one shared base copy where the
    method never writes base weights, else on a freshly loaded base model of its own.
    ``share_base=False`` forces separate copies (for measuring)."""
    from lemoe.methods import build_method

    cls = type(store.method)
    share = not cls.edits_base_weights if share_base is None else share_base
    if share and cls.edits_base_weights:
        raise ValueError(f"method {cls.name!r} edits the base weights; its replicas need copies of their own")

    def make() -> EditMethod:
        if share:
            model, tokenizer = shared_base_copy(store.method.model), copy.deepcopy(store.method.tokenizer)
        else:
            from lemoe.models import load_model

            model, tokenizer = load_model(store.spec.model, device=device)
        return build_method(store.spec.method, model, tokenizer, store.spec.options)

    return make


class ServingReplicas:
    """Two method replicas on their own base-model copies: one active, one being refreshed."""

    def __init__(self, make_method: Callable[[], EditMethod]) -> None:
        self._replicas = [Replica(make_method()), Replica(make_method())]
        self._active = 0
        self._swap = threading.Lock()
        self.last_publish: dict[str, Any] = {}  # what the newest publish did (tests, benchmarks)

    def publish(self, state: dict[str, torch.Tensor], meta: dict[str, Any], version: int) -> None:
        """Load a new state into the standby replica, then make it the active one. Only keys whose
        tensor changed since this replica's last load are copied (none for copy-on-write methods)."""
        start = time.perf_counter()
        with self._swap:
            standby = self._replicas[1 - self._active]
        with standby.lock:  # waits for a reader that took it while it was active
            share = type(standby.method).state_copy_on_write
            given: dict[str, torch.Tensor] = {}
            changed, copied = [], 0
            for k, t in state.items():
                known = standby.given.get(k)
                if known is not None and known[0]() is t and known[1] == t._version and known[2]._version == known[3]:
                    given[k] = known[2]
                    continue
                changed.append(k)
                given[k] = t if share else t.clone()
                copied += 0 if share else t.numel() * t.element_size()
            standby.method.reset()
            standby.method.load_state_dict(given, meta)
            standby.given = {k: (weakref.ref(state[k]), state[k]._version, v, v._version) for k, v in given.items()}
            standby.version = version
        with self._swap:
            self._active = self._replicas.index(standby)
        self.last_publish = {
            "changed_keys": changed,
            "copied_bytes": copied,
            "shared": share,
            "seconds": time.perf_counter() - start,
        }

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        limits: Sequence[int],
        on_step: Callable[[list[int], list[int]], Sequence[bool]],
    ) -> int:
        """Decode one padded batch with the newest published state; returns that state's version."""
        with self._swap:
            replica = self._replicas[self._active]
        with replica.lock:
            decode_batch(replica.method, prompt_ids, limits, on_step)
            return replica.version

    def tokenizer(self) -> Any:
        return self._replicas[self._active].method.tokenizer

    def generate(self, prompts: list[str], max_new_tokens: list[int]) -> tuple[list[str], int]:
        """Greedy continuations (one padded batch) with the newest published state; (texts, version)."""
        with self._swap:
            replica = self._replicas[self._active]
        with replica.lock, torch.no_grad():
            method = replica.method
            ids = [method.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]  # type: ignore[operator]
            new = greedy_generate(
                method.model, method.tokenizer, ids, max_new_tokens, batch_size=len(ids), context=method.forward_context
            )
            texts = [method.tokenizer.decode(n, skip_special_tokens=True) for n in new]  # type: ignore[attr-defined]
            return texts, replica.version
