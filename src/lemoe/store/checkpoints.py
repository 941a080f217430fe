"""Method-state checkpoints on disk: written into a private folder, made durable, then renamed.

A checkpoint folder holds the method's ``save_pretrained`` output (``config.json`` +
``state.safetensors``) and a ``manifest.json`` naming the batches whose effect the state holds.
It only counts once the journal records it (with the files' checksums) in the same transaction as
the status change it belongs to; a folder the journal does not name is debris of a killed write.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lemoe import fileio
from lemoe.methods.base import EditMethod, StateError, read_state_meta
from lemoe.store.spec import (
    StoreCorruptError,
    checkpoint_dirname,
    is_own_checkpoint_entry,
    sha256_file,
)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class WrittenCheckpoint:
    dirname: str
    state_sha256: str
    config_sha256: str


def write_checkpoint(
    method: EditMethod, root: Path, ckpt_id: int, batches: list[int], edits_digest: str
) -> WrittenCheckpoint:
    """Write the method's state as checkpoint ``ckpt_id`` under ``root``; durable on return."""
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_dirname(ckpt_id)
    final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    method.save_pretrained(tmp)  # each file: temp, fsync, rename
    manifest = {"ckpt_id": ckpt_id, "batches": batches, "edits_digest": edits_digest}
    fileio.write_json(tmp / MANIFEST, manifest)
    fileio.fsync_dir(tmp)
    if final.exists():  # debris of an earlier attempt that was killed before the journal named it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fileio.fsync_dir(root)
    return WrittenCheckpoint(name, sha256_file(final / "state.safetensors"), sha256_file(final / "config.json"))


def check_checkpoint_files(folder: Path, state_sha256: str, config_sha256: str) -> dict[str, Any]:
    """Verify a checkpoint's files against the journal's checksums; return its ``config.json`` meta."""
    if not folder.is_dir():
        raise StoreCorruptError(f"{folder}: checkpoint folder is missing")
    for fname, expected in (("state.safetensors", state_sha256), ("config.json", config_sha256)):
        path = folder / fname
        if not path.is_file():
            raise StoreCorruptError(f"{path}: missing")
        if sha256_file(path) != expected:
            raise StoreCorruptError(f"{path}: checksum differs from the journal (truncated or changed)")
    try:
        return read_state_meta(folder)
    except StateError as e:
        raise StoreCorruptError(str(e)) from None


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreCorruptError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("batches"), list):
        raise StoreCorruptError(f"{path}: manifest has no batch list")
    return data


def load_checkpoint(method: EditMethod, folder: Path, state_sha256: str, config_sha256: str) -> None:
    """Reset ``method`` and load the checkpoint's state into it (checksums verified first)."""
    meta = check_checkpoint_files(folder, state_sha256, config_sha256)
    if meta["method"] != method.name:
        raise StoreCorruptError(f"{folder}: checkpoint was written by method {meta['method']!r}, not {method.name!r}")
    try:
        state = load_file(str(folder / "state.safetensors"))
    except Exception as e:  # safetensors raises several error types on corrupt files
        raise StoreCorruptError(f"{folder}: cannot read state ({e})") from None
    method.reset()
    method.load_state_dict(state, meta["meta"])


def stray_folders(root: Path, known: set[str]) -> list[Path]:
    """Folders of the store's own naming that the journal does not name (left by a killed write)."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.name not in known and is_own_checkpoint_entry(p.name) and not p.is_symlink()
    )


def foreign_entries(root: Path) -> list[Path]:
    """Entries under ``checkpoints/`` that the store never writes: reported, never read or deleted."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not is_own_checkpoint_entry(p.name) or p.is_symlink())
