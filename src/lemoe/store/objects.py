"""The store's content-addressed object folder, ``STORE/objects/``: immutable files named by their hash.

Every object is ``<sha256 of its bytes>.safetensors`` (a group of tensors) or ``<sha256>.json``
(an index of log segments, see :mod:`lemoe.store.checkpoints`). An object is written once, through
:mod:`lemoe.fileio` (temp file, fsync, rename), and never changed: writing the same content again
finds the file and checks it instead. Names read from a manifest are untrusted: only 64 lowercase
hex digits are accepted, and the path is built here from the validated name, so no manifest can
make the store read or delete anything outside ``objects/``. Every read checks the bytes against
the name before parsing them.

The store only ever deletes names of its own pattern (objects and their fileio temp files) that no
checkpoint the journal names references; anything else in the folder is reported, never touched.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lemoe import fileio
from lemoe.store.spec import StoreCorruptError

OBJECT_DIR = "objects"
KINDS = ("safetensors", "json")
_HASH = re.compile(r"[0-9a-f]{64}")
_OWN = re.compile(r"[0-9a-f]{64}\.(?:safetensors|json)")
# lemoe.fileio's temp siblings of an object: ".<name>.tmp-<pid>-<8 hex>"
_OWN_TEMP = re.compile(r"\.[0-9a-f]{64}\.(?:safetensors|json)\.tmp-\d+-[0-9a-f]{8}")


def check_name(name: Any, where: str) -> str:
    """An object hash read from a manifest or index: 64 lowercase hex digits, nothing else."""
    if not isinstance(name, str) or not _HASH.fullmatch(name):
        raise StoreCorruptError(
            f"{where}: names object {str(name)[:80]!r}, which is not a sha256 under objects/; the file was "
            "changed outside lemoe, so nothing was read or removed (restore the store from a backup)"
        )
    return name


def is_own_entry(name: str) -> bool:
    return bool(_OWN.fullmatch(name) or _OWN_TEMP.fullmatch(name))


class ObjectStore:
    """``root/objects``: put and get immutable tensor groups and JSON indexes by sha256."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / OBJECT_DIR
        self.bytes_written = 0  # counters for benchmarks and tests
        self.objects_written = 0

    def path(self, name: str, kind: str) -> Path:
        assert kind in KINDS and _HASH.fullmatch(name), (name, kind)
        return self.root / f"{name}.{kind}"

    # -- writing ------------------------------------------------------------------------------------
    def _put(self, data: bytes, kind: str) -> str:
        name = hashlib.sha256(data).hexdigest()
        path = self.path(name, kind)
        if path.is_file() and not path.is_symlink():
            try:
                if hashlib.sha256(path.read_bytes()).hexdigest() == name:
                    return name  # written before (content-addressed): nothing to do
            except OSError:
                pass
        self.root.mkdir(exist_ok=True)
        fileio.write_bytes(path, data)
        self.bytes_written += len(data)
        self.objects_written += 1
        return name

    def put_tensors(self, tensors: dict[str, torch.Tensor]) -> str:
        return self._put(st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}), "safetensors")

    def put_json(self, obj: Any) -> str:
        return self._put(fileio.dumps(obj, indent=None, sort_keys=True).encode("utf-8"), "json")

    # -- reading (untrusted) ------------------------------------------------------------------------
    def _read(self, name: str, kind: str, where: str) -> bytes:
        path = self.path(check_name(name, where), kind)
        if path.is_symlink() or not path.is_file():
            raise StoreCorruptError(f"{path}: object named by {where} is missing; restore the store from a backup")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != name:
            raise StoreCorruptError(
                f"{path}: checksum differs from its name (truncated or changed); restore the store from a backup"
            )
        return data

    def get_tensors(self, name: str, where: str) -> dict[str, torch.Tensor]:
        data = self._read(name, "safetensors", where)
        try:
            return st_load(data)
        except Exception as e:  # safetensors raises several error types on malformed files
            raise StoreCorruptError(f"{self.path(name, 'safetensors')}: cannot read tensors ({e})") from None

    def get_json(self, name: str, where: str) -> Any:
        data = self._read(name, "json", where)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreCorruptError(f"{self.path(name, 'json')}: corrupt JSON ({e})") from None

    def check(self, name: str, kind: str, where: str) -> None:
        """Raise unless the object exists and its bytes hash to its name."""
        self._read(name, kind, where)

    # -- listing and sweeping -----------------------------------------------------------------------
    def own_entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if is_own_entry(p.name) and not p.is_symlink())

    def foreign_entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if not is_own_entry(p.name) or p.is_symlink())

    def unreferenced(self, referenced: set[str]) -> list[Path]:
        """Own entries whose name is in no referenced set (temp files always are)."""
        return [p for p in self.own_entries() if p.name.split(".")[0] not in referenced or p.name.startswith(".")]

    def remove(self, names: set[str]) -> int:
        """Delete these objects (both kinds); return how many files went."""
        gone = 0
        for name in names:
            for kind in KINDS:
                path = self.path(name, kind)
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    gone += 1
        return gone
