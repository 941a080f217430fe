"""The lifelong edit store: a directory that makes an editing method's state durable and reversible.

Layout::

    STORE/store.json          identity: base model (name + fingerprint), method + config, format
    STORE/journal.sqlite      every accepted request, its batch, status, timestamps, hashes
    STORE/checkpoints/ckpt-*  method states: manifest.json (batches) + state.json (meta, object refs)
    STORE/objects/<sha256>.*  immutable tensor groups and log indexes, named by their hash
    STORE/writer.lock         held (flock) by the one process that may change the store

Persistence is incremental (:mod:`lemoe.store.checkpoints`): a checkpoint writes only the objects
that changed since the previous one -- for a method that declares append-only state (LEMoE: one
frozen expert per batch) one segment with the new batch's rows -- and references the rest, so the
bytes and seconds per batch do not grow with the number of batches. Objects are written before the
checkpoint folder that references them, the folder before the journal row that names it; old
checkpoints and the objects only they used are removed after the journal commit, and ``open``
sweeps objects no journal checkpoint references (debris of a killed write).

The order of writes is what makes a SIGKILL at any point harmless:

1. ``submit``: requests are validated, then committed as ``accepted`` in one transaction.
2. ``apply_pending``: a batch row with its edits is committed (``pending``) *before* the method sees
   it; after the method returns the batch becomes ``applied``; every ``checkpoint_every`` batches the
   state is written (temp folder, fsync, rename) and only then recorded in the journal.
3. ``open`` recovers: it loads the newest checkpoint whose batch list is a prefix of the journal's
   live batches (every object it references checked against its hash) and re-applies the rest,
   each exactly once and with the same composition.

Rollback uses the method's own ``rollback`` when it has one; otherwise, on request
(``replay=True``), the state is rebuilt from the newest usable checkpoint (or the base model) by
re-applying every remaining batch -- exact for deterministic methods, a re-optimisation otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lemoe import fileio
from lemoe.methods import METHODS, build_method
from lemoe.methods.base import EditMethod, RollbackNotSupported
from lemoe.models.identity import fingerprint_mismatch, model_fingerprint
from lemoe.requests import EditRequest, InvalidRequestError, validate_batch
from lemoe.store import journal
from lemoe.store.checkpoints import Checkpoints, WrittenCheckpoint, stray_folders
from lemoe.store.journal import CheckpointRow, EditRow
from lemoe.store.spec import (
    CHECKPOINT_DIR,
    JOURNAL_FILE,
    LOCK_FILE,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreSpec,
    read_spec,
    sha256_text,
    write_spec,
)
from lemoe.store.verify import verify_store

Loaded = tuple[torch.nn.Module, object]


def default_method() -> str:
    """LEMoE once it is registered, FT-M before."""
    return "lemoe" if "lemoe" in METHODS else "ft-m"


class DuplicateEditError(StoreError):
    """A request id that is already live in the store was submitted with different content."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock."""


@dataclass
class Submitted:
    seq: int
    request_id: str
    duplicate: bool  # True: the same request was already in the store (idempotent resubmission)


@dataclass
class AppliedBatch:
    batch_id: int
    seqs: list[int]
    seconds: float
    info: dict[str, Any]


def _load_base(spec_model: str, device: str) -> Loaded:
    from lemoe.models import load_model

    return load_model(spec_model, device=device)


class EditStore:
    """An open store with its method on the base model. Use :meth:`init` or :meth:`open`.

    Thread safety: journal access is serialised by one lock and is fast; the method is only touched
    by the thread that calls ``apply_pending`` / ``rollback`` (the service's writer), so readers of
    the journal are never blocked by an edit in progress.
    """

    def __init__(self, root: Path, spec: StoreSpec, conn: Any, method: EditMethod, lock_fd: int) -> None:
        self.root = root
        self.spec = spec
        self.method = method
        self._conn = conn
        self._lock_fd = lock_fd
        self._db_lock = threading.RLock()
        self._since_checkpoint = 0
        self._checkpoints = Checkpoints(root)
        self.last_checkpoint: WrittenCheckpoint | None = None  # what the newest write cost (benchmarks)
        self.closed = False

    # -- creation and opening -----------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        root: str | Path,
        *,
        model: str = "smollm2-135m",
        method: str | None = None,
        options: dict[str, Any] | None = None,
        edits_per_step: int = 1,
        checkpoint_every: int = 1,
        keep_checkpoints: int = 3,
        loaded: Loaded | None = None,
        device: str = "cpu",
    ) -> EditStore:
        """Create a new store for ``method`` on base model ``model`` and open it."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root}: exists and is not empty; a store is created in a new or empty folder")
        method = method or default_method()
        if method not in METHODS:
            raise StoreError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
        base, tokenizer = loaded if loaded is not None else _load_base(model, device)
        edit_method = build_method(method, base, tokenizer, options or {})  # validates the options first
        spec = StoreSpec(
            model=model,
            model_fingerprint=edit_method.base_fingerprint,
            method=method,
            options=edit_method.config.to_dict(),
            edits_per_step=edits_per_step,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
        )
        root.mkdir(parents=True, exist_ok=True)
        (root / CHECKPOINT_DIR).mkdir(exist_ok=True)
        # The journal first, store.json last: a folder without store.json is not (yet) a store.
        tmp_db = root / f".{JOURNAL_FILE}.init"
        for p in root.glob(f".{JOURNAL_FILE}.init*"):
            p.unlink()
        conn = journal.connect(tmp_db)
        spec_text_sha = _spec_sha(spec)
        journal.create_schema(conn, spec.store_id, spec_text_sha)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        os.replace(tmp_db, root / JOURNAL_FILE)
        fileio.fsync_dir(root)
        for p in root.glob(f".{JOURNAL_FILE}.init-*"):
            p.unlink()
        if write_spec(root, spec) != spec_text_sha:
            raise StoreError("internal error: store.json hash changed while writing")
        return cls._open_checked(root, spec, edit_method)

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        loaded: Loaded | None = None,
        device: str = "cpu",
        expect_method: str | None = None,
        expect_model: str | None = None,
    ) -> EditStore:
        """Open a store, verify its identity, and recover its method state (crash recovery)."""
        root = Path(root)
        spec, spec_sha = read_spec(root)
        if expect_method is not None and expect_method != spec.method:
            raise StoreMismatchError(f"{root}: store was written for method {spec.method!r}, not {expect_method!r}")
        if expect_model is not None and expect_model != spec.model:
            raise StoreMismatchError(f"{root}: store was written for base model {spec.model!r}, not {expect_model!r}")
        if spec.method not in METHODS:
            raise StoreMismatchError(f"{root}: store uses method {spec.method!r}, which this lemoe does not have")
        journal.check_identity(root, spec, spec_sha)
        report = verify_store(root, checkpoints=False)
        if not report.ok:
            problems = "; ".join(report.problems[:5]) + (" ..." if len(report.problems) > 5 else "")
            raise StoreCorruptError(f"{root}: journal check failed ({problems}); see `lemoe store verify {root}`")
        base, tokenizer = loaded if loaded is not None else _load_base(spec.model, device)
        mismatch = fingerprint_mismatch(spec.model_fingerprint, model_fingerprint(base))
        if mismatch:
            raise StoreMismatchError(f"{root}: store does not fit the base model given ({spec.model}): {mismatch}")
        edit_method = build_method(spec.method, base, tokenizer, spec.options)
        return cls._open_checked(root, spec, edit_method)

    @classmethod
    def _open_checked(cls, root: Path, spec: StoreSpec, method: EditMethod) -> EditStore:
        lock_fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreBusyError(f"{root}: another process has this store open for writing") from None
        conn = journal.connect(root / JOURNAL_FILE)
        store = cls(root, spec, conn, method, lock_fd)
        try:
            store.recover()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._db_lock:
            self._conn.close()
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> EditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery -----------------------------------------------------------------------------------
    def recover(self) -> list[int]:
        """Bring the method to the journal's state: newest usable checkpoint + replay of the rest.

        Returns the batches that were re-applied. Also removes checkpoint folders the journal does
        not name (debris of a killed checkpoint write).
        """
        with self._db_lock:
            live = journal.live_batches(self._conn)
            checkpoints = journal.list_checkpoints(self._conn)
        ckpt_root = self.root / CHECKPOINT_DIR
        for stray in stray_folders(ckpt_root, {c.dirname for c in checkpoints}):
            shutil.rmtree(stray, ignore_errors=True)
        self._checkpoints.sweep(checkpoints)  # objects of killed writes and interrupted prunes
        replayed = self._rebuild(live, checkpoints)
        if replayed:
            self.checkpoint()
        return replayed

    def _rebuild(self, live: list[int], checkpoints: list[CheckpointRow]) -> list[int]:
        """Load the newest checkpoint whose batches prefix ``live``; apply the remaining batches."""
        start: CheckpointRow | None = None
        for c in checkpoints:  # newest first
            if list(c.batches) == live[: len(c.batches)]:
                start = c
                break
        if start is None:
            self.method.reset()
            self._checkpoints.forget()
            done = 0
        else:
            self._checkpoints.load(
                self.method, self.root / CHECKPOINT_DIR / start.dirname, start.state_sha256, start.config_sha256
            )
            done = len(start.batches)
        for batch_id in live[done:]:
            with self._db_lock:
                requests = journal.batch_requests(self._conn, batch_id)
            self._apply_batch(batch_id, requests)
        self._since_checkpoint = len(live) - done
        return live[done:]

    # -- submitting and applying --------------------------------------------------------------------
    def submit(self, requests: Sequence[EditRequest], *, max_queued: int | None = None) -> list[Submitted]:
        """Validate and durably accept ``requests`` (all or none). Resubmitting a live request with the
        same id and content is a no-op that returns its seq; the same id with other content is refused."""
        batch = validate_batch(requests)
        ids = [r.request_id for r in batch]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("the submission holds the same request_id twice")
        with self._db_lock, journal.transaction(self._conn):
            out: list[Submitted | None] = []
            fresh: list[EditRequest] = []
            for r in batch:
                existing = journal.find_live_edit(self._conn, r.request_id)
                if existing is None:
                    out.append(None)
                    fresh.append(r)
                elif existing.request == journal.request_json(r):
                    out.append(Submitted(existing.seq, r.request_id, True))
                else:
                    raise DuplicateEditError(
                        f"request_id {r.request_id!r} is already in the store (edit {existing.seq}) with other content"
                    )
            if max_queued is not None and fresh:
                queued = journal.count_edits(self._conn)["accepted"]
                if queued + len(fresh) > max_queued:
                    raise StoreBusyError(f"the edit queue is full ({queued} waiting); retry later")
            seqs = iter(journal.insert_edits(self._conn, self.spec.store_id, fresh, journal.now()))
            return [
                s if s is not None else Submitted(next(seqs), r.request_id, False)
                for s, r in zip(out, batch, strict=True)
            ]

    def pending_count(self) -> int:
        with self._db_lock:
            return journal.count_edits(self._conn)["accepted"]

    def apply_pending(self, max_batches: int | None = None) -> list[AppliedBatch]:
        """Apply accepted edits in arrival order, ``edits_per_step`` per batch. Single writer only."""
        applied: list[AppliedBatch] = []
        while max_batches is None or len(applied) < max_batches:
            with self._db_lock, journal.transaction(self._conn):
                rows = journal.list_edits(self._conn, status="accepted", limit=self.spec.edits_per_step)
                if not rows:
                    break
                batch_id = journal.create_batch(self._conn, [r.seq for r in rows], journal.now())
            requests = [r.to_request() for r in rows]
            applied.append(self._apply_batch(batch_id, requests, [r.seq for r in rows]))
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.spec.checkpoint_every:
                self.checkpoint()
        return applied

    def _apply_batch(self, batch_id: int, requests: list[EditRequest], seqs: list[int] | None = None) -> AppliedBatch:
        try:
            report = self.method.apply(requests)
        except Exception:
            # The method may have changed the model half-way: mark the batch failed, then rebuild
            # the state from the journal so memory matches it again.
            with self._db_lock, journal.transaction(self._conn):
                journal.set_batch_status(self._conn, batch_id, "failed", journal.now())
            with self._db_lock:
                live, checkpoints = journal.live_batches(self._conn), journal.list_checkpoints(self._conn)
            self._rebuild(live, checkpoints)
            raise
        with self._db_lock, journal.transaction(self._conn):
            journal.set_batch_status(
                self._conn, batch_id, "applied", journal.now(), method_index=report.batch_index, info=report.info
            )
        return AppliedBatch(batch_id, seqs or [], report.seconds, report.info)

    def checkpoint(self) -> CheckpointRow:
        """Write the current state as a checkpoint; record it; prune old ones."""
        with self._db_lock:
            live = journal.live_batches(self._conn)
            ckpt_id = journal.next_checkpoint_id(self._conn)
            digest = journal.edits_digest(self._conn, live)
        written = self._checkpoints.write(self.method, ckpt_id, live, digest)
        row = CheckpointRow(
            ckpt_id, written.dirname, tuple(live), digest, written.state_sha256, written.config_sha256, journal.now()
        )
        with self._db_lock, journal.transaction(self._conn):
            journal.insert_checkpoint(self._conn, row)
        self._checkpoints.commit(written)
        self.last_checkpoint = written
        self._since_checkpoint = 0
        self._prune()
        return row

    def _prune(self) -> None:
        with self._db_lock:
            rows = journal.list_checkpoints(self._conn)
            kept, old = rows[: self.spec.keep_checkpoints], rows[self.spec.keep_checkpoints :]
            if not old:
                return
            with journal.transaction(self._conn):
                journal.delete_checkpoints(self._conn, [c.ckpt_id for c in old])
        # after the commit: a kill here leaves stray folders and objects, removed on open
        self._checkpoints.prune(old, kept)

    # -- history ------------------------------------------------------------------------------------
    def rollback(self, batch_ids: Sequence[int], *, replay: bool = False) -> list[int]:
        """Undo applied batches. Native rollback when the method has it; else ``replay=True`` rebuilds
        the state without them; else :class:`RollbackNotSupported` and nothing changes."""
        targets = sorted(set(batch_ids))
        if not targets:
            raise StoreError("nothing to roll back")
        with self._db_lock:
            for b in targets:
                row = journal.get_batch(self._conn, b)
                if row is None:
                    raise StoreError(f"no batch {b} in the store")
                if row.status != "applied":
                    raise StoreError(f"batch {b} is {row.status}, only applied batches can be rolled back")
            live = journal.live_batches(self._conn)
            checkpoints = journal.list_checkpoints(self._conn)
        remaining = [b for b in live if b not in targets]
        native = self.method.supports_rollback and not replay
        if not native and not replay:
            raise RollbackNotSupported(
                f"method {self.method.name!r} cannot roll back a batch itself; use replay (--replay) to rebuild "
                "its state from the base model without those batches (re-applies every remaining batch)"
            )
        try:
            if native:
                with self._db_lock:
                    index = {b: journal.get_batch(self._conn, b).method_index for b in targets}  # type: ignore[union-attr]
                for b in reversed(targets):
                    self.method.rollback(int(index[b]))  # type: ignore[arg-type]
            else:
                self._rebuild(remaining, checkpoints)
            with self._db_lock:
                ckpt_id = journal.next_checkpoint_id(self._conn)
                digest = journal.edits_digest(self._conn, remaining)
            written = self._checkpoints.write(self.method, ckpt_id, remaining, digest)
            row = CheckpointRow(
                ckpt_id,
                written.dirname,
                tuple(remaining),
                digest,
                written.state_sha256,
                written.config_sha256,
                journal.now(),
            )
            with self._db_lock, journal.transaction(self._conn):
                now = journal.now()
                for b in targets:
                    journal.set_batch_status(self._conn, b, "rolled_back", now)
                journal.insert_checkpoint(self._conn, row)
            self._checkpoints.commit(written)
            self.last_checkpoint = written
        except BaseException:
            with contextlib.suppress(Exception):
                self.recover()
            raise
        self._since_checkpoint = 0
        self._prune()
        return targets

    def rollback_after(self, batch_id: int, *, replay: bool = False) -> list[int]:
        """Undo every applied batch after ``batch_id`` (0: everything)."""
        with self._db_lock:
            later = [b.batch_id for b in journal.list_batches(self._conn, "applied") if b.batch_id > batch_id]
        if not later:
            raise StoreError(f"no applied batch after batch {batch_id}")
        return self.rollback(later, replay=replay)

    def edits(self, **filters: Any) -> list[EditRow]:
        with self._db_lock:
            return journal.list_edits(self._conn, **filters)

    def edit(self, seq: int) -> EditRow | None:
        with self._db_lock:
            return journal.get_edit(self._conn, seq)

    def batches(self, status: str | None = None) -> list[journal.BatchRow]:
        with self._db_lock:
            return journal.list_batches(self._conn, status)

    def counts(self) -> dict[str, int]:
        with self._db_lock:
            return journal.count_edits(self._conn)

    def info(self) -> dict[str, Any]:
        with self._db_lock:
            checkpoints = journal.list_checkpoints(self._conn)
            n_batches = len(journal.live_batches(self._conn))
        return {
            "store": str(self.root),
            "model": self.spec.model,
            "method": self.spec.method,
            "supports_rollback": self.method.supports_rollback,
            "edits_per_step": self.spec.edits_per_step,
            "edits": self.counts(),
            "live_batches": n_batches,
            "latest_checkpoint": checkpoints[0].ckpt_id if checkpoints else None,
        }

    def export(self, out: str | Path) -> Path:
        """Write the edited state for another machine: the method's ``save_pretrained`` folder (loadable
        with ``lemoe.methods.load_method`` / ``lemoe eval``), plus ``edits.jsonl`` and ``store.json``."""
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise StoreError(f"{out}: exists and is not empty")
        if self.pending_count():
            raise StoreError("the store has accepted edits that are not applied yet; apply them first")
        with fileio.atomic_directory(out) as tmp:
            self.method.save_pretrained(tmp)
            lines = [json.dumps(e.summary(), ensure_ascii=False) for e in self.edits(status="applied")]
            fileio.write_text(tmp / "edits.jsonl", "".join(line + "\n" for line in lines))
            fileio.write_text(tmp / "store.json", json.dumps(self.spec.to_dict(), indent=2, sort_keys=True))
        return out


def _spec_sha(spec: StoreSpec) -> str:
    return sha256_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
