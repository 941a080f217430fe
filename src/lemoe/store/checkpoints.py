"""Method-state checkpoints: small manifests over content-addressed objects, written incrementally.

A checkpoint folder ``checkpoints/ckpt-NNNNNNNN/`` holds two small files:

- ``manifest.json``: the checkpoint id, the batches whose effect the state holds, their edit digest;
- ``state.json``: the method, config and base-model fingerprint, the method's JSON meta, and the
  state's tensors as references to objects in ``objects/`` (:mod:`lemoe.store.objects`).

The tensors come in two kinds:

- *full* keys: one object per tensor. A tensor that is the same object at the same ``_version`` as
  at the last checkpoint reuses its hash without being read again; any other tensor is hashed
  (content addressing then still writes nothing when it did not change).
- *log* keys, the method's :meth:`~lemoe.methods.base.EditMethod.append_only_state` (LEMoE's
  stacked experts and router keys): their rows are a log of *segments*, each one object holding
  the rows appended to every log key since the previous checkpoint (plus the items appended to the
  meta's lists, e.g. LEMoE's ``expert_requests``). A checkpoint writes one new segment: its bytes
  do not grow with the number of earlier batches. When the epochs change (reset, load, rollback),
  the log restarts with one segment holding everything (O(state) once).

The segment list is kept short in ``state.json`` by packing, like a binary counter in base
``FANOUT``: level 0 lists segments inline; whenever a level holds ``FANOUT`` entries they are
written as one immutable index object (``<sha>.json``) listed one level up. ``state.json`` thus
holds at most ``FANOUT - 1`` entries per level, ``log_FANOUT(batches)`` levels.

Write order (a SIGKILL at any point is harmless): every new object (temp file, fsync, rename), then
the two files in a private folder that is fsynced and renamed into place; only then does the
caller record the checkpoint in the journal (with both files' checksums); only after that commit
are old checkpoints and the objects no kept checkpoint references removed. Objects written by a
killed checkpoint are named by no journal checkpoint and are swept on the next open.

Old stores' checkpoints (``config.json`` + ``state.safetensors``, the full state) still load.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lemoe import fileio
from lemoe.methods.base import FORMAT_VERSION, EditMethod, StateError, read_state_meta
from lemoe.store.journal import decode_batches, encode_batches
from lemoe.store.objects import ObjectStore, check_name
from lemoe.store.spec import (
    CHECKPOINT_DIR,
    StoreCorruptError,
    checkpoint_dirname,
    is_own_checkpoint_entry,
    sha256_file,
)

MANIFEST = "manifest.json"
STATE_FILE = "state.json"
STATE_FORMAT = "lemoe-store-state"
FANOUT = 16
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


@dataclass(frozen=True)
class WrittenCheckpoint:
    dirname: str
    state_sha256: str  # of state.json (legacy checkpoints: of state.safetensors)
    config_sha256: str  # of manifest.json (legacy checkpoints: of config.json)
    bytes_written: int = 0
    objects_written: int = 0
    pending: _Head | None = field(default=None, repr=False, compare=False)


@dataclass
class _Head:
    """What the writer knows about the state of the last committed (or loaded) checkpoint."""

    doc: dict[str, Any]  # the checkpoint's state.json document
    epochs: dict[str, int]  # append_only_state() at that point
    last_rows: dict[str, torch.Tensor]  # a copy of each log key's last row (a cheap guard)
    lists: dict[str, list[Any]]  # the meta lists logged, as they were
    tensor_ids: dict[str, tuple[Any, int, str]] = field(default_factory=dict)  # key -> (weakref, _version, sha)


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise StateError(f"the edit store cannot hold tensors of dtype {t.dtype}")
    return name


def _expect(cond: bool, where: Path | str, what: str) -> None:
    if not cond:
        raise StoreCorruptError(f"{where}: {what}; the file was changed outside lemoe (restore from a backup)")


def _shape(value: Any, where: Path) -> list[int]:
    _expect(isinstance(value, list) and all(type(x) is int and x >= 0 for x in value), where, "malformed shape")
    return value


class Checkpoints:
    """The checkpoints and objects of one store, and the incremental writer's memory of the last one."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / CHECKPOINT_DIR
        self.objects = ObjectStore(store_root)
        self._head: _Head | None = None
        self._index: dict[str, tuple[list[Any], frozenset[str]]] = {}  # index sha -> (segments, refs)

    # -- writing ------------------------------------------------------------------------------------
    def write(self, method: EditMethod, ckpt_id: int, batches: list[int], edits_digest: str) -> WrittenCheckpoint:
        """Write the method's state as checkpoint ``ckpt_id``: durable on return, not yet recorded.
        Call :meth:`commit` once the journal names it."""
        before = (self.objects.bytes_written, self.objects.objects_written)
        state, meta = method.state_dict(), method.state_meta()
        epochs = dict(method.append_only_state())
        head = self._head
        log_keys = sorted(k for k in state if k in epochs and state[k].dim() >= 1)
        list_keys = sorted(k for k, v in meta.items() if isinstance(v, list))
        extend = head is not None and self._extends(head, state, meta, epochs, log_keys, list_keys)
        old_log = head.doc["log"] if extend and head is not None else None

        # full keys: reuse the hash of an unchanged tensor object, else hash (and write if new)
        full: dict[str, Any] = {}
        tensor_ids: dict[str, tuple[Any, int, str]] = {}
        for k in sorted(set(state) - set(log_keys)):
            t = state[k]
            known = head.tensor_ids.get(k) if head is not None else None
            if known is not None and known[0]() is t and known[1] == t._version:
                sha = known[2]
            else:
                sha = self.objects.put_tensors({"tensor": t})
            full[k] = {"object": sha, "dtype": _dtype_name(t), "shape": list(t.shape)}
            tensor_ids[k] = (weakref.ref(t), t._version, sha)

        # log keys: one segment with the rows (and list items) appended since the last checkpoint
        tensors_doc = {k: {"dtype": _dtype_name(state[k]), "shape": list(state[k].shape)} for k in log_keys}
        start_rows = {k: old_log["tensors"][k]["shape"][0] if old_log else 0 for k in log_keys}
        start_items = {k: old_log["lists"][k] if old_log else 0 for k in list_keys}
        levels: list[list[Any]] = [list(level) for level in old_log["levels"]] if old_log else [[]]
        rows = {k: state[k][start_rows[k] :] for k in log_keys if state[k].shape[0] > start_rows[k]}
        items = {k: meta[k][start_items[k] :] for k in list_keys if len(meta[k]) > start_items[k]}
        if rows or items:
            segment: dict[str, Any] = {
                "object": self.objects.put_tensors(rows) if rows else None,
                "rows": {k: int(v.shape[0]) for k, v in rows.items()},
                "items": items,
            }
            levels[0].append(segment)
            self._pack(levels)
        doc = {
            "format": STATE_FORMAT,
            "format_version": FORMAT_VERSION,
            "method": method.name,
            "config": method.config.to_dict(),
            "model": method.base_fingerprint,
            "meta": {k: v for k, v in meta.items() if k not in list_keys},
            "full": full,
            "log": {"tensors": tensors_doc, "lists": {k: len(meta[k]) for k in list_keys}, "levels": levels},
        }
        manifest = {"ckpt_id": ckpt_id, "batches": encode_batches(batches), "edits_digest": edits_digest}
        name = self._write_folder(ckpt_id, doc, manifest)
        folder = self.root / name
        pending = _Head(
            doc=json.loads(fileio.dumps(doc)),
            epochs={k: epochs[k] for k in [*log_keys, *list_keys] if k in epochs},
            last_rows={k: state[k][-1].detach().clone() for k in log_keys if state[k].shape[0]},
            lists=_list_guards(meta, list_keys, epochs),
            tensor_ids=tensor_ids,
        )
        return WrittenCheckpoint(
            name,
            sha256_file(folder / STATE_FILE),
            sha256_file(folder / MANIFEST),
            self.objects.bytes_written - before[0] + sum((folder / f).stat().st_size for f in (STATE_FILE, MANIFEST)),
            self.objects.objects_written - before[1],
            pending,
        )

    def commit(self, written: WrittenCheckpoint) -> None:
        """The journal now names ``written``: the next checkpoint is incremental on top of it."""
        if written.pending is not None:
            self._head = written.pending

    def forget(self) -> None:
        """The method was reset: the next checkpoint writes the whole state."""
        self._head = None

    @staticmethod
    def _extends(
        head: _Head,
        state: dict[str, torch.Tensor],
        meta: dict[str, Any],
        epochs: dict[str, int],
        log_keys: list[str],
        list_keys: list[str],
    ) -> bool:
        """May the new state's log keys and lists be written as an extension of the head's log?"""
        old = head.doc["log"]
        if sorted(old["tensors"]) != log_keys or sorted(old["lists"]) != list_keys:
            return False
        for k in log_keys:
            t, spec = state[k], old["tensors"][k]
            n = spec["shape"][0]
            if head.epochs.get(k) != epochs[k] or _dtype_name(t) != spec["dtype"]:
                return False
            if list(t.shape[1:]) != spec["shape"][1:] or t.shape[0] < n:
                return False
            if n and not torch.equal(t[n - 1].detach().cpu(), head.last_rows[k].cpu()):
                return False  # the method changed an earlier row without bumping its epoch
        for k in list_keys:
            n, value, known = old["lists"][k], meta[k], head.lists[k]
            if len(value) < n:
                return False
            if head.epochs.get(k) == epochs.get(k, object()):  # declared append-only: check the last item
                if n and _normal(value[n - 1]) != known[-1]:
                    return False
            elif _normal(value[:n]) != known:  # O(len) comparison for lists the method did not declare
                return False
        return True

    def _pack(self, levels: list[list[Any]]) -> None:
        level = 0
        while len(levels[level]) >= FANOUT:
            entries = levels[level]
            sha = self.objects.put_json({"format": "lemoe-log-index", "level": level + 1, "entries": entries})
            self._index[sha] = (self._flatten(entries, level, Path("(new index)")), self._refs(entries, level))
            levels[level] = []
            if len(levels) == level + 1:
                levels.append([])
            levels[level + 1].append(sha)
            level += 1

    def _write_folder(self, ckpt_id: int, doc: dict[str, Any], manifest: dict[str, Any]) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        name = checkpoint_dirname(ckpt_id)
        final, tmp = self.root / name, self.root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fileio.write_json(tmp / STATE_FILE, doc, indent=None, sort_keys=True)
        fileio.write_json(tmp / MANIFEST, manifest)
        fileio.fsync_dir(tmp)
        if final.exists():  # debris of an earlier attempt that was killed before the journal named it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fileio.fsync_dir(self.root)
        return name

    # -- reading (untrusted) ------------------------------------------------------------------------
    def read_doc(self, folder: Path, state_sha256: str, config_sha256: str) -> dict[str, Any]:
        """``state.json`` of an incremental checkpoint, its checksums verified and structure checked."""
        for fname, expected in ((STATE_FILE, state_sha256), (MANIFEST, config_sha256)):
            path = folder / fname
            if not path.is_file():
                raise StoreCorruptError(f"{path}: missing")
            if sha256_file(path) != expected:
                raise StoreCorruptError(f"{path}: checksum differs from the journal (truncated or changed)")
        path = folder / STATE_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreCorruptError(f"{path}: unreadable ({e})") from None
        _expect(isinstance(doc, dict) and doc.get("format") == STATE_FORMAT, path, "not a lemoe store state")
        if doc.get("format_version") != FORMAT_VERSION:
            raise StoreCorruptError(f"{path}: state format {doc.get('format_version')!r}, this lemoe reads 1")
        for key, kind in (("method", str), ("config", dict), ("model", dict), ("meta", dict), ("full", dict)):
            _expect(isinstance(doc.get(key), kind), path, f"{key!r} missing or malformed")
        log = doc.get("log")
        _expect(isinstance(log, dict) and set(log) == {"tensors", "lists", "levels"}, path, "malformed log")
        _expect(isinstance(log["tensors"], dict) and isinstance(log["lists"], dict), path, "malformed log")
        _expect(isinstance(log["levels"], list) and len(log["levels"]) >= 1, path, "malformed log levels")
        for k, spec in {**doc["full"], **log["tensors"]}.items():
            _expect(isinstance(spec, dict) and spec.get("dtype") in _DTYPES, path, f"tensor {k!r}: bad dtype")
            _shape(spec.get("shape"), path)
            if k in doc["full"]:
                check_name(spec.get("object"), f"{path} (tensor {k!r})")
            else:
                _expect(len(spec["shape"]) >= 1, path, f"log tensor {k!r} has no rows dimension")
        for k, n in log["lists"].items():
            _expect(type(n) is int and n >= 0 and k not in doc["meta"], path, f"list {k!r}: bad length")
        for level, entries in enumerate(log["levels"]):
            _expect(isinstance(entries, list) and len(entries) < FANOUT, path, f"log level {level} malformed")
            for e in entries:
                if level == 0:
                    self._check_segment(e, path)
                else:
                    check_name(e, f"{path} (log level {level})")
        return doc

    @staticmethod
    def _check_segment(seg: Any, where: Path) -> None:
        _expect(isinstance(seg, dict) and set(seg) == {"object", "rows", "items"}, where, "malformed log segment")
        if seg["object"] is not None:
            check_name(seg["object"], f"{where} (log segment)")
        _expect(isinstance(seg["rows"], dict) and isinstance(seg["items"], dict), where, "malformed log segment")
        _expect(all(type(n) is int and n > 0 for n in seg["rows"].values()), where, "malformed segment rows")
        _expect((seg["object"] is None) == (not seg["rows"]), where, "segment rows without an object")
        _expect(all(isinstance(v, list) for v in seg["items"].values()), where, "malformed segment items")

    def _index_entries(self, sha: str, level: int, where: Path) -> list[Any]:
        doc = self.objects.get_json(sha, f"{where} (log level {level})")
        ipath = self.objects.path(sha, "json")
        _expect(isinstance(doc, dict) and doc.get("format") == "lemoe-log-index", ipath, "not a log index")
        _expect(doc.get("level") == level and isinstance(doc.get("entries"), list), ipath, "wrong index level")
        _expect(len(doc["entries"]) == FANOUT, ipath, f"an index holds {FANOUT} entries")
        for e in doc["entries"]:
            if level == 1:
                self._check_segment(e, ipath)
            else:
                check_name(e, f"{ipath} (log level {level - 1})")
        return doc["entries"]

    def _expand(self, sha: str, level: int, where: Path) -> tuple[list[Any], frozenset[str]]:
        if sha not in self._index:
            entries = self._index_entries(sha, level, where)
            self._index[sha] = (self._flatten(entries, level - 1, where), self._refs(entries, level - 1))
        return self._index[sha]

    def _flatten(self, entries: list[Any], level: int, where: Path) -> list[Any]:
        if level == 0:
            return list(entries)
        out: list[Any] = []
        for sha in entries:
            out.extend(self._expand(sha, level, where)[0])
        return out

    def _refs(self, entries: list[Any], level: int) -> frozenset[str]:
        if level == 0:
            return frozenset(s["object"] for s in entries if s["object"] is not None)
        out: set[str] = set(entries)
        for sha in entries:
            out |= self._expand(sha, level, Path("(log index)"))[1]
        return frozenset(out)

    def segments(self, doc: dict[str, Any], where: Path) -> list[Any]:
        """The log's segments, oldest first."""
        levels = doc["log"]["levels"]
        out: list[Any] = []
        for level in range(len(levels) - 1, -1, -1):
            out.extend(self._flatten(levels[level], level, where))
        return out

    def references(self, doc: dict[str, Any], where: Path) -> set[str]:
        """Every object the checkpoint needs (tensor objects and log indexes)."""
        refs = {spec["object"] for spec in doc["full"].values()}
        levels = doc["log"]["levels"]
        for level in range(len(levels) - 1, 0, -1):
            for sha in levels[level]:
                refs.add(sha)
                refs |= self._expand(sha, level, where)[1]
        refs |= self._refs(levels[0], 0)
        return refs

    def assemble(self, doc: dict[str, Any], where: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The state tensors and meta the checkpoint describes; every object checked against its hash."""
        state: dict[str, torch.Tensor] = {}
        for k, spec in doc["full"].items():
            obj = self.objects.get_tensors(spec["object"], f"{where} (tensor {k!r})")
            t = obj.get("tensor")
            _expect(
                t is not None and len(obj) == 1 and list(t.shape) == spec["shape"] and _dtype_name(t) == spec["dtype"],
                self.objects.path(spec["object"], "safetensors"),
                f"does not hold tensor {k!r} as {where} describes it",
            )
            state[k] = t
        log = doc["log"]
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in log["tensors"]}
        lists: dict[str, list[Any]] = {k: [] for k in log["lists"]}
        for seg in self.segments(doc, where):
            _expect(
                set(seg["rows"]) <= set(parts) and set(seg["items"]) <= set(lists), where, "segment names unknown keys"
            )
            if seg["object"] is not None:
                obj = self.objects.get_tensors(seg["object"], f"{where} (log segment)")
                opath = self.objects.path(seg["object"], "safetensors")
                _expect(set(obj) == set(seg["rows"]), opath, "segment object holds other keys than its entry says")
                for k, n in seg["rows"].items():
                    spec, t = log["tensors"][k], obj[k]
                    ok = t.dim() >= 1 and t.shape[0] == n and list(t.shape[1:]) == spec["shape"][1:]
                    _expect(ok and _dtype_name(t) == spec["dtype"], opath, f"rows of {k!r} have the wrong shape")
                    parts[k].append(t)
            for k, v in seg["items"].items():
                lists[k].extend(v)
        for k, spec in log["tensors"].items():
            dtype = _DTYPES[spec["dtype"]]
            t = torch.cat(parts[k]) if parts[k] else torch.zeros([0, *spec["shape"][1:]], dtype=dtype)
            _expect(list(t.shape) == spec["shape"], where, f"log of {k!r} does not add up to its shape")
            state[k] = t
        for k, n in log["lists"].items():
            _expect(len(lists[k]) == n, where, f"list {k!r} does not add up to its length")
        return state, {**doc["meta"], **lists}

    def load(self, method: EditMethod, folder: Path, state_sha256: str, config_sha256: str) -> None:
        """Reset ``method`` and load the checkpoint into it (every checksum verified first)."""
        if not folder.is_dir():
            raise StoreCorruptError(f"{folder}: checkpoint folder is missing")
        if not (folder / STATE_FILE).exists() and (folder / "state.safetensors").exists():
            self._load_legacy(method, folder, state_sha256, config_sha256)
            self._head = None
            return
        doc = self.read_doc(folder, state_sha256, config_sha256)
        if doc["method"] != method.name:
            raise StoreCorruptError(
                f"{folder}: checkpoint was written by method {doc['method']!r}, not {method.name!r}"
            )
        state, meta = self.assemble(doc, folder / STATE_FILE)
        method.reset()
        method.load_state_dict(state, meta)
        epochs = method.append_only_state()
        log = doc["log"]["tensors"]
        if set(log) <= set(epochs):
            list_keys = list(doc["log"]["lists"])
            self._head = _Head(
                doc=doc,
                epochs={k: epochs[k] for k in [*log, *list_keys] if k in epochs},
                last_rows={k: state[k][-1].clone() for k in log if state[k].shape[0]},
                lists=_list_guards(meta, list_keys, epochs),
            )
        else:
            self._head = None

    @staticmethod
    def _load_legacy(method: EditMethod, folder: Path, state_sha256: str, config_sha256: str) -> None:
        meta = check_legacy_files(folder, state_sha256, config_sha256)
        if meta["method"] != method.name:
            raise StoreCorruptError(
                f"{folder}: checkpoint was written by method {meta['method']!r}, not {method.name!r}"
            )
        try:
            state = load_file(str(folder / "state.safetensors"))
        except Exception as e:  # safetensors raises several error types on corrupt files
            raise StoreCorruptError(f"{folder}: cannot read state ({e})") from None
        method.reset()
        method.load_state_dict(state, meta["meta"])

    def checkpoint_meta(self, folder: Path, state_sha256: str, config_sha256: str) -> tuple[dict[str, Any], set[str]]:
        """(method/config/model meta, referenced objects) of a checkpoint, for verify and pruning.
        Index objects are read and checked; tensor objects are not."""
        if not folder.is_dir():
            raise StoreCorruptError(f"{folder}: checkpoint folder is missing")
        if not (folder / STATE_FILE).exists() and (folder / "state.safetensors").exists():
            return check_legacy_files(folder, state_sha256, config_sha256), set()
        doc = self.read_doc(folder, state_sha256, config_sha256)
        return doc, self.references(doc, folder / STATE_FILE)

    def index_names(self) -> set[str]:
        """The log index objects read or written so far (the other references are tensor objects)."""
        return set(self._index)

    # -- removing -----------------------------------------------------------------------------------
    def sweep(self, rows: list[Any]) -> list[Path]:
        """Remove every own object no checkpoint in ``rows`` (all the journal names) references.
        If any of them cannot be read, nothing is removed (it cannot be shown unreferenced)."""
        referenced: set[str] = set()
        try:
            for r in rows:
                referenced |= self.checkpoint_meta(self.root / r.dirname, r.state_sha256, r.config_sha256)[1]
        except StoreCorruptError:
            return []
        gone = self.objects.unreferenced(referenced)
        for p in gone:
            p.unlink(missing_ok=True)
        return gone

    def prune(self, removed: list[Any], kept: list[Any]) -> None:
        """After the journal dropped ``removed``: delete their folders and the objects only they used."""
        try:
            theirs: set[str] = set()
            for r in removed:
                theirs |= self.checkpoint_meta(self.root / r.dirname, r.state_sha256, r.config_sha256)[1]
            for r in kept:
                theirs -= self.checkpoint_meta(self.root / r.dirname, r.state_sha256, r.config_sha256)[1]
        except StoreCorruptError:
            theirs = set()  # cannot prove an object unused: keep them all (verify reports the damage)
        for r in removed:  # after the journal commit: a kill here leaves debris, removed on open
            shutil.rmtree(self.root / r.dirname, ignore_errors=True)
        self.objects.remove(theirs)


def _normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(fileio.dumps(value, indent=None))


def _list_guards(meta: dict[str, Any], list_keys: list[str], epochs: dict[str, int]) -> dict[str, list[Any]]:
    """What the next checkpoint compares a logged meta list with: its last item when the method
    declares the list append-only, else (O(len)) the whole list."""
    out = {}
    for k in list_keys:
        value = meta[k]
        out[k] = _normal(value[-1:]) if k in epochs else _normal(value)
    return out


def check_legacy_files(folder: Path, state_sha256: str, config_sha256: str) -> dict[str, Any]:
    """Verify an old-format checkpoint's files against the journal's checksums; return its meta."""
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
    return {**data, "batches": list(decode_batches(data["batches"], str(path)))}


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
