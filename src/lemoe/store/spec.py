"""The store's identity file, ``store.json``: which base model, which method and config, which format.

It is written once, atomically, when the store is created, and its checksum is kept in the journal,
so a store can never silently be reopened with another model, method or layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lemoe import fileio

STORE_FORMAT_VERSION = 2  # 2: incremental checkpoints (state.json over objects/); written by init
READABLE_FORMAT_VERSIONS = (1, 2)  # 1: full checkpoints only; such a store is read and extended as is
SPEC_FILE = "store.json"
JOURNAL_FILE = "journal.sqlite"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "writer.lock"
# The only folder names a store reads or deletes under CHECKPOINT_DIR: its checkpoints and the
# private folders they are written in. Anything else there is not the store's and is left alone.
_OWN_CHECKPOINT_ENTRY = re.compile(r"(?:ckpt-\d{8}|\.tmp-ckpt-\d{8}-\d+)")


class StoreError(ValueError):
    """A store operation cannot be done; the message says why and what to do."""


class StoreMismatchError(StoreError):
    """The store was written for another base model, method or format version."""


class StoreCorruptError(StoreError):
    """A store file is missing, truncated or was changed outside lemoe (run ``lemoe store verify``)."""


@dataclass
class StoreSpec:
    """Everything that fixes what a store's journal means; immutable after ``init``."""

    model: str  # name or path given to ``load_model``
    model_fingerprint: dict[str, Any]
    method: str
    options: dict[str, Any]
    edits_per_step: int = 1
    checkpoint_every: int = 1  # write a checkpoint after every K applied batches
    keep_checkpoints: int = 3
    format_version: int = STORE_FORMAT_VERSION
    store_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in ("edits_per_step", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreError(f"{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = SPEC_FILE) -> StoreSpec:
        if not isinstance(data, dict):
            raise StoreCorruptError(f"{where}: expected a JSON object")
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise StoreMismatchError(
                f"{where}: store format version {version!r}; this lemoe reads versions {READABLE_FORMAT_VERSIONS}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"model", "model_fingerprint", "method", "options"} - set(data)
        if missing or set(data) - names:
            raise StoreCorruptError(f"{where}: missing {sorted(missing)} / unknown {sorted(set(data) - names)} keys")
        return cls(**data)


def checkpoint_dirname(ckpt_id: int) -> str:
    """The folder of checkpoint ``ckpt_id``: always derived from the id, never read from a file."""
    if not isinstance(ckpt_id, int) or not 1 <= ckpt_id <= 99_999_999:
        raise StoreCorruptError(f"checkpoint id {ckpt_id!r} is not a positive id of at most 8 digits")
    return f"ckpt-{ckpt_id:08d}"


def is_own_checkpoint_entry(name: str) -> bool:
    """Whether a name under ``checkpoints/`` is one the store writes (a checkpoint or its temp folder)."""
    return _OWN_CHECKPOINT_ENTRY.fullmatch(name) is not None


def canonical_json(data: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) so hashes of the same content are equal."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_spec(root: Path, spec: StoreSpec) -> str:
    """Write ``store.json`` atomically; return its sha256 (recorded in the journal)."""
    text = json.dumps(spec.to_dict(), indent=2, sort_keys=True)
    fileio.write_text(root / SPEC_FILE, text)
    return sha256_text(text)


def read_spec(root: Path) -> tuple[StoreSpec, str]:
    """Read ``store.json``; return the spec and the file's sha256."""
    path = root / SPEC_FILE
    if not path.is_file():
        raise StoreError(f"{root}: not an edit store (no {SPEC_FILE}); create one with `lemoe store init`")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreCorruptError(f"{path}: corrupt JSON ({e})") from None
    return StoreSpec.from_dict(data, where=str(path)), sha256_text(text)
