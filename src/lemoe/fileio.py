"""Durable, pickle-free file writes: the one place lemoe turns bytes into files.

Every file lemoe writes (results records, saved states, checkpoints, caches, store exports) goes
through :func:`atomic_path`: the bytes go to a temp file in the target's folder whose name is unique
to this process and call, the file is fsynced, renamed over the target, and the folder is fsynced.
A reader sees the old file or the new one, never half of one; two runs writing the same path never
share a temp file; a write that fails leaves no temp file behind. :func:`atomic_directory` does the
same for a folder of files.

Nested training state (optimizer state, histories) is saved with :func:`save_tree` as a JSON file
plus a safetensors file of its tensors, so loading a file that came from elsewhere can never run code
(``torch.load`` unpickles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR_TAG = "__tensor__"


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; NTFS journals renames itself
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new content to; on success it replaces ``path`` durably.

    ``with atomic_path(p) as tmp: save_file(tensors, tmp)``: the writer may be any function that
    takes a path. On an exception the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def json_default(value: Any) -> Any:
    """The only conversions lemoe's JSON makes: numeric scalars (numpy, 0-d tensors) to numbers and
    paths to strings. Anything else raises ``TypeError`` instead of being stringified silently."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable (lemoe does not stringify it silently)")


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=json_default)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """JSON with no silent conversion (:func:`json_default`); a bad value raises before any write."""
    return write_text(path, dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it is renamed to ``path`` and the parent fsynced.

    Every file inside is fsynced before the rename, whoever wrote it (e.g. a library's
    ``save_pretrained``). ``path`` must not exist, or be an empty folder, unless ``replace`` (then an
    existing one is removed only after the new one is complete). On an exception the temp folder is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not an empty folder")
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        for sub in sorted(tmp.rglob("*"), reverse=True):  # files, then their folders
            if sub.is_file():
                with open(sub, "rb+") as f:
                    os.fsync(f.fileno())
            elif sub.is_dir():
                fsync_dir(sub)
        fsync_dir(tmp)
        if path.is_dir() and replace and any(path.iterdir()):
            shutil.rmtree(path)
        elif path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def save_tree(path: str | Path, tree: Any, *, to_json: Callable[[Any], Any] | None = None) -> Path:
    """Save nested dicts/lists of JSON values and tensors as ``path`` (JSON) + ``path.tensors``.

    The JSON names each tensor by key and holds the tensors file's checksum, so a pair from two
    different saves is refused on load. ``to_json`` may convert other leaves; anything else raises."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = node.detach().cpu().contiguous()
            return {_TENSOR_TAG: key}
        if isinstance(node, dict):
            if not all(isinstance(k, str | int) for k in node):
                raise TypeError(f"save_tree: dict keys must be str or int, got {list(node)[:3]}")
            # int keys (optimizer state) keep their type through a tagged pair list
            return {"__items__": [[k, walk(v)] for k, v in node.items()]}
        if isinstance(node, list | tuple):
            return [walk(v) for v in node]
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if to_json is not None:
            return walk(to_json(node))
        raise TypeError(f"save_tree: cannot store a {type(node).__name__} without pickling it")

    body = walk(tree)
    tensor_path = path.with_name(path.name + ".tensors")
    with atomic_path(tensor_path) as tmp:
        save_file(tensors, str(tmp))
    digest = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    write_json(path, {"format_version": 1, "tensors_sha256": digest, "tree": body})
    return path


def load_tree(path: str | Path) -> Any:
    """Inverse of :func:`save_tree`; raises ``ValueError`` on a corrupt or mismatched pair."""
    path = Path(path)
    tensor_path = path.with_name(path.name + ".tensors")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        digest = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read saved state ({e})") from None
    if not isinstance(doc, dict) or doc.get("format_version") != 1 or "tree" not in doc:
        raise ValueError(f"{path}: not a lemoe saved state (format_version 1)")
    if doc.get("tensors_sha256") != digest:
        raise ValueError(f"{tensor_path}: checksum differs from {path.name} (corrupt, or from another save)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as e:  # safetensors raises several error types on corrupt files
        raise ValueError(f"{tensor_path}: cannot read tensors ({e})") from None

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {_TENSOR_TAG}:
                return tensors[node[_TENSOR_TAG]]
            return {k: walk(v) for k, v in node["__items__"]}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    try:
        return walk(doc["tree"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed saved state ({e})") from None
