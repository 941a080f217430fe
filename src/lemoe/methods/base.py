"""The one interface every editing method implements, and the registry of methods by name.

A method object owns all of its state: the model it edits, its config, and whatever it adds
(experts, hook weights, bases, caches). Nothing lives at module level. The contract:

- ``apply(requests)`` validates the whole batch first (a bad record rejects the batch and changes
  nothing), then edits; the model stays usable for ``generate`` afterwards.
- ``reset()`` returns the model to its unedited state in memory (chunked protocols use it instead
  of reloading from disk).
- ``state_dict()/load_state_dict()`` hold the method's edited state; ``save_pretrained(dir)`` and
  ``from_pretrained(dir, model, tokenizer)`` write and read it as ``config.json`` +
  ``state.safetensors``.
- ``forward_context(prompt_mask)`` wraps evaluator forwards; methods whose behaviour depends on
  which tokens are the prompt (LEMoE's routing) use it, others inherit a no-op.
- ``rollback(batch)`` undoes one batch where the method supports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

from lemoe import fileio
from lemoe.models.access import ModelAccess
from lemoe.models.identity import fingerprint_mismatch, model_fingerprint
from lemoe.requests import EditRequest, validate_batch

FORMAT_VERSION = 1


class StateError(ValueError):
    """A saved state is missing, corrupt, or written for another method/model/format."""


class RollbackNotSupported(NotImplementedError):
    pass


@dataclass
class MethodConfig:
    """Base for method configs: plain dataclasses that round-trip through JSON."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class BatchReport:
    """What one ``apply`` did: for logs, results files and the edit store."""

    batch_index: int
    n_requests: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


Self = TypeVar("Self", bound="EditMethod")


class EditMethod(ABC):
    """Base class of editing methods. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    supports_rollback: ClassVar[bool] = False
    # True when a tensor ``state_dict`` returned is never changed in place afterwards (every change
    # binds new tensors): serving replicas then share the tensors instead of copying them.
    state_copy_on_write: ClassVar[bool] = False
    # False for adaptor methods that never change the base model's weights (hooks and their own
    # tensors only): serving replicas may then run on one shared copy of the base weights.
    edits_base_weights: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: MethodConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.name} expects {self.config_class.__name__}, got {type(self.config).__name__}")
        self.access = ModelAccess(model)
        self.base_fingerprint = model_fingerprint(model)  # before any edit: in-place edits change it
        self.batches_applied = 0

    # -- editing ---------------------------------------------------------------------------------
    def apply(self, requests: Sequence[EditRequest]) -> BatchReport:
        """Validate the whole batch, then edit. Raises before any change if a record is bad."""
        batch = validate_batch(requests)
        start = time.perf_counter()
        info = self._apply(batch) or {}
        self.batches_applied += 1
        return BatchReport(self.batches_applied - 1, len(batch), time.perf_counter() - start, info)

    @abstractmethod
    def _apply(self, requests: list[EditRequest]) -> dict[str, Any] | None:
        """Edit the model with one validated batch; return diagnostics for the report."""

    @abstractmethod
    def reset(self) -> None:
        """Return the model to its unedited state, in memory."""

    def rollback(self, batch_index: int) -> None:
        raise RollbackNotSupported(f"{self.name} cannot roll back a single batch")

    def plan_batches(self, requests: Sequence[EditRequest], batch_size: int) -> list[list[EditRequest]]:
        """Split a known edit stream into batches; arrival order unless a method plans otherwise."""
        return [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]

    def forward_context(self, prompt_mask: torch.Tensor) -> AbstractContextManager[object]:
        return nullcontext()

    # -- state -----------------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of the edited state (not the base model)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore the edited state onto this (unedited) model."""

    def append_only_state(self) -> dict[str, int]:
        """State keys that, while their epoch (the value) stays the same, only ever grow by rows
        appended along dim 0 -- earlier rows never change. The edit store then writes only the new
        rows of such a key at each checkpoint. A method bumps the epoch whenever it changes earlier
        rows (reset, load, rollback). Default: none -- every key may change at any time."""
        return {}

    def state_meta(self) -> dict[str, Any]:
        """JSON-serialisable state that is not a tensor (counters, thresholds, batch ids)."""
        return {"batches_applied": self.batches_applied}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``state.safetensors`` atomically (temp file, fsync, rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        state_path = directory / "state.safetensors"
        with fileio.atomic_path(state_path) as tmp:
            save_file(tensors, str(tmp))
        digest = hashlib.sha256(state_path.read_bytes()).hexdigest()
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "config": self.config.to_dict(),
            "model": self.base_fingerprint,
            "state_sha256": digest,
            "meta": self.state_meta(),
        }
        fileio.write_json(directory / "config.json", meta)
        return directory

    @classmethod
    def from_pretrained(cls: type[Self], directory: str | Path, model: torch.nn.Module, tokenizer: object) -> Self:
        meta = read_state_meta(directory)
        if meta["method"] != cls.name:
            raise StateError(f"{directory}: state was saved by method {meta['method']!r}, not {cls.name!r}")
        mismatch = fingerprint_mismatch(meta["model"], model_fingerprint(model))
        if mismatch:
            raise StateError(f"{directory}: cannot load onto this model: {mismatch}")
        method = cls(model, tokenizer, cls.config_class.from_dict(meta["config"]))
        state_path = Path(directory) / "state.safetensors"
        try:
            state = load_file(str(state_path))
        except Exception as e:  # safetensors raises several error types on corrupt files
            raise StateError(f"{state_path}: cannot read state ({e})") from None
        method.load_state_dict(state, meta["meta"])
        return method


def read_state_meta(directory: str | Path) -> dict[str, Any]:
    """Read and verify a saved state's ``config.json`` and checksum; raise :class:`StateError`."""
    directory = Path(directory)
    cfg_path, state_path = directory / "config.json", directory / "state.safetensors"
    if not cfg_path.exists() or not state_path.exists():
        raise StateError(f"{directory}: not a saved lemoe state (needs config.json and state.safetensors)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise StateError(f"{cfg_path}: corrupt JSON ({e})") from None
    for key in ("format_version", "method", "config", "model", "state_sha256", "meta"):
        if key not in meta:
            raise StateError(f"{cfg_path}: missing {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise StateError(f"{cfg_path}: format version {meta['format_version']} (this lemoe reads {FORMAT_VERSION})")
    digest = hashlib.sha256(state_path.read_bytes()).hexdigest()
    if digest != meta["state_sha256"]:
        raise StateError(f"{state_path}: checksum mismatch (file is corrupt or was changed)")
    return meta
