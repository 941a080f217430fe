"""Resumable protocol runs: every N steps, save the method's state and the runner's log so far.

A long run cut short (a time limit, a crash, the end of a session) restarts from its last
checkpoint instead of from the unedited model. On restart the runner still computes the unedited
model's reference answers (they need the unedited model, and cost one evaluation pass), then loads
the saved edited state onto the reset model and goes on at the next step.

Directory layout: ``progress.json`` (which run this is, how far it got, the runner's log) and
``state-<chunk>-<step>/`` (the method's ``save_pretrained``). ``progress.json`` is replaced
atomically only after its state directory is complete, and older state directories are removed
only after that, so a crash at any moment leaves a consistent pair. A checkpoint of another run
(other method, config, protocol, requests or base model) is refused with an error, never resumed.

The directory may be the user's: a non-empty directory that holds no checkpoint is refused before
anything is written, and ``clear`` removes only the files this checkpoint wrote (``progress.json``
and its ``state-<chunk>-<step>/`` folders), and the directory itself only when the checkpoint
created it and nothing else is left in it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lemoe import fileio
from lemoe.methods.base import EditMethod, read_state_meta
from lemoe.requests import EditRequest
from lemoe.runner.protocol import Protocol

PROGRESS = "progress.json"
STATE_NAME = re.compile(r"state-\d+-\d+")


class CheckpointMismatch(ValueError):
    """The checkpoint directory holds another run's progress, or files that are not a checkpoint."""


def run_key(method: EditMethod, protocol: Protocol, ordered: Sequence[EditRequest]) -> dict[str, Any]:
    """What makes two runs the same run: method and config, protocol, edit stream, base model."""
    stream = fileio.dumps([r.to_dict() for r in ordered], indent=None, sort_keys=True)
    return {
        "method": method.name,
        "config": method.config.to_dict(),
        "protocol": protocol.to_dict(),
        "requests_sha256": hashlib.sha256(stream.encode()).hexdigest(),
        "model": method.base_fingerprint,
    }


@dataclass
class RunCheckpoint:
    """Where and how often to checkpoint; optional hooks for a caller's own per-step state.

    ``save_extra`` returns JSON-ready state of the caller's ``on_step`` consumers (e.g. a list of
    measurements so far) and ``restore_extra`` gets it back after the method state is loaded.
    """

    directory: Path
    every: int = 25
    save_extra: Callable[[], dict[str, Any]] | None = None
    restore_extra: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.every < 1:
            raise ValueError(f"checkpoint every must be at least 1 step, got {self.every}")
        self._created = not self.directory.exists()
        if not self._created:
            self._refuse_foreign_directory()

    def _refuse_foreign_directory(self) -> None:
        """A directory that exists must be empty or hold a checkpoint: never write into user files."""
        if not self.directory.is_dir():
            raise CheckpointMismatch(f"{self.directory} is not a directory; choose a new or empty directory")
        if (self.directory / PROGRESS).is_file():
            return
        if any(self.directory.iterdir()):
            raise CheckpointMismatch(
                f"{self.directory} is not empty and holds no checkpoint ({PROGRESS} missing); nothing was "
                "written. Choose a new or empty directory for --checkpoint"
            )

    def load(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The saved progress of this run, or None when there is none; raises on another run's."""
        path = self.directory / PROGRESS
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointMismatch(f"{path}: corrupt checkpoint ({e}); remove the directory to start over") from None
        if not isinstance(saved, dict) or saved.get("key") != key:
            raise CheckpointMismatch(
                f"{self.directory} holds a checkpoint of another run (method, config, protocol, edits or "
                "model differ); remove it or choose another directory"
            )
        self._created = bool(saved.get("created_directory", False))
        return saved

    def save(self, method: EditMethod, key: dict[str, Any], position: dict[str, Any], log: dict[str, Any]) -> None:
        """Write the method state, then point ``progress.json`` at it, then drop older states."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"state-{position['chunk']}-{position['step']}"
        method.save_pretrained(self.directory / name)
        extra = self.save_extra() if self.save_extra is not None else {}
        record = {
            "key": key,
            "state": name,
            **position,
            "log": log,
            "extra": extra,
            "created_directory": self._created,
        }
        fileio.write_json(self.directory / PROGRESS, record, indent=None)
        for old in self._written_states():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def _written_states(self) -> list[Path]:
        """State folders this checkpoint wrote (its own naming, a saved method state inside)."""
        if not self.directory.is_dir():
            return []
        return [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and not p.is_symlink() and STATE_NAME.fullmatch(p.name) and (p / "config.json").is_file()
        ]

    def restore(self, method: EditMethod, saved: dict[str, Any]) -> None:
        """Load the saved state onto ``method`` (already reset to the unedited model).

        At step 0 a chunk starts from the unedited model, so only the caller's extra state returns.
        """
        if saved["step"] > 0:
            directory = self.directory / saved["state"]
            meta = read_state_meta(directory)  # checksum verified here
            method.load_state_dict(load_file(str(directory / "state.safetensors")), meta["meta"])
            method.batches_applied = int(meta["meta"].get("batches_applied", saved["step"]))
        if self.restore_extra is not None:
            self.restore_extra(saved.get("extra", {}))

    def clear(self) -> None:
        """Remove what the checkpoint wrote once the run's results are safely written; nothing else."""
        for state in self._written_states():
            shutil.rmtree(state, ignore_errors=True)
        (self.directory / PROGRESS).unlink(missing_ok=True)
        if self._created and self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()
