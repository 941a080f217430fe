"""``verify``: check a store without changing it, and say exactly what is wrong.

Checks: identity (store.json against the journal), SQLite integrity, every edit's content hash and
the hash chain over all edits, status consistency between edits and batches, and every checkpoint's
files (checksums, loadable config, manifest) against the journal, including a digest of the edits
each checkpoint holds. The checkpoints table is covered field by field: the folder name must be the
one its id gives (never a path read from the file), the manifest must name the same id and batches,
the file checksums must match, and the edits digest is recomputed from the hash-chained edits.
Every object a checkpoint references must exist under ``objects/`` and hash to its name.
Debris of killed writes is reported as a warning, not a problem.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lemoe.requests import InvalidRequestError
from lemoe.store import journal
from lemoe.store.checkpoints import Checkpoints, foreign_entries, read_manifest, stray_folders
from lemoe.store.spec import CHECKPOINT_DIR, StoreError, sha256_text


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.summary.items()]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append("store OK" if self.ok else f"store has {len(self.problems)} problem(s)")
        return "\n".join(lines)


def verify_store(root: str | Path, *, checkpoints: bool = True) -> VerifyReport:
    """Check the store at ``root``; never raises for a damaged store, reports instead.

    ``checkpoints=False`` checks only the identity and the journal (what ``EditStore.open`` runs; the
    checkpoint it loads is verified when loaded).
    """
    root = Path(root)
    report = VerifyReport()
    try:
        spec, conn = journal.open_readonly(root)
    except (StoreError, sqlite3.DatabaseError) as e:
        report.problems.append(str(e))
        return report
    try:
        _check(root, spec, conn, report, checkpoints)
    except sqlite3.DatabaseError as e:
        report.problems.append(f"journal is not readable ({e})")
    finally:
        conn.close()
    return report


def _check(root: Path, spec: Any, conn: sqlite3.Connection, report: VerifyReport, with_checkpoints: bool) -> None:
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    if integrity != "ok":
        report.problems.append(f"journal: SQLite integrity check failed: {integrity}")
        return
    report.summary.update(model=spec.model, method=spec.method, edits_per_step=spec.edits_per_step)
    edits = journal.list_edits(conn)
    batches = {b.batch_id: b for b in journal.list_batches(conn)}
    report.summary["edits"] = len(edits)
    report.summary["batches"] = len(batches)

    chain = journal.chain_start(spec.store_id)
    live_ids: dict[str, int] = {}
    for e in edits:
        if sha256_text(e.request) != e.content_hash:
            report.problems.append(f"edit {e.seq}: content hash mismatch (the request text was changed)")
        else:
            try:
                req = e.to_request()
                if req.request_id != e.request_id or journal.request_json(req) != e.request:
                    report.problems.append(f"edit {e.seq}: request id or encoding differs from the stored request")
            except (InvalidRequestError, ValueError) as err:
                report.problems.append(f"edit {e.seq}: stored request is invalid ({err})")
        chain = journal.next_chain(chain, e.content_hash)
        if chain != e.chain:
            report.problems.append(f"edit {e.seq}: hash chain broken (rows were edited, removed or reordered)")
            chain = e.chain  # report each break once
        if e.status not in journal.EDIT_STATUSES:
            report.problems.append(f"edit {e.seq}: unknown status {e.status!r}")
        if e.status == "accepted" and e.batch_id is not None:
            report.problems.append(f"edit {e.seq}: accepted but assigned to batch {e.batch_id}")
        if e.status != "accepted":
            batch = batches.get(e.batch_id) if e.batch_id is not None else None
            if batch is None:
                report.problems.append(f"edit {e.seq}: status {e.status} but no batch {e.batch_id}")
            elif batch.status != e.status:
                report.problems.append(f"edit {e.seq}: status {e.status} but batch {batch.batch_id} is {batch.status}")
        if e.status not in ("rolled_back", "failed"):
            if e.request_id in live_ids:
                other = live_ids[e.request_id]
                report.problems.append(f"edit {e.seq}: request id {e.request_id!r} is live twice (also edit {other})")
            live_ids[e.request_id] = e.seq
    in_batch = {e.batch_id for e in edits if e.batch_id is not None}
    for b in batches.values():
        if b.status not in journal.BATCH_STATUSES:
            report.problems.append(f"batch {b.batch_id}: unknown status {b.status!r}")
        if b.batch_id not in in_batch:
            report.problems.append(f"batch {b.batch_id}: holds no edit")
    report.summary["edits_by_status"] = {k: v for k, v in journal.count_edits(conn).items() if v}
    if with_checkpoints:
        _check_checkpoints(root, spec, conn, report, batches)


def _check_checkpoints(
    root: Path, spec: Any, conn: sqlite3.Connection, report: VerifyReport, batches: dict[int, Any]
) -> None:
    try:
        checkpoints = journal.list_checkpoints(conn)
    except StoreError as e:
        report.problems.append(str(e))
        return
    report.summary["checkpoints"] = [c.ckpt_id for c in checkpoints]
    ckpt_root = root / CHECKPOINT_DIR
    store = Checkpoints(root)
    live = journal.live_batches(conn)
    referenced: set[str] = set()
    checked: set[str] = set()
    unreadable = False
    for i, c in enumerate(checkpoints):
        where = f"checkpoint {c.ckpt_id}"
        folder = ckpt_root / c.dirname
        try:
            meta, refs = store.checkpoint_meta(folder, c.state_sha256, c.config_sha256)
            manifest = read_manifest(folder)
        except StoreError as e:
            report.problems.append(f"{where}: {e}")
            unreadable = True
            continue
        referenced |= refs
        for name in sorted(refs - checked - store.index_names()):  # each tensor object once
            checked.add(name)
            try:
                store.objects.check(name, "safetensors", where)
            except StoreError as e:
                report.problems.append(f"{where}: {e}")
        if meta["method"] != spec.method or meta["config"] != spec.options:
            report.problems.append(f"{where}: written by another method or config ({meta['method']})")
        if meta["model"] != spec.model_fingerprint:
            report.problems.append(f"{where}: written for another base model")
        if manifest.get("ckpt_id") != c.ckpt_id:
            report.problems.append(f"{where}: manifest names checkpoint {manifest.get('ckpt_id')!r}")
        if manifest["batches"] != list(c.batches):
            report.problems.append(f"{where}: manifest batches differ from the journal's")
        if manifest.get("edits_digest") != c.edits_digest:
            report.problems.append(f"{where}: manifest edit digest differs from the journal's")
        if journal.edits_digest(conn, c.batches) != c.edits_digest:
            report.problems.append(f"{where}: the journal's edits of its batches changed since it was written")
        for b in c.batches:
            if b not in batches:
                report.problems.append(f"{where}: holds batch {b}, which the journal does not have")
        if i == 0 and list(c.batches) != live[: len(c.batches)]:
            report.warnings.append(f"{where} (newest) holds no prefix of the live batches; open() starts earlier")
    if live and checkpoints:
        newest = checkpoints[0]
        behind = len(live) - len(newest.batches)
        if behind > 0:
            report.warnings.append(f"{behind} live batch(es) after the newest checkpoint: re-applied on open")
    for stray in stray_folders(ckpt_root, {c.dirname for c in checkpoints}):
        report.warnings.append(f"{stray}: not named by the journal (debris of a killed write; removed on open)")
    for entry in foreign_entries(ckpt_root) + store.objects.foreign_entries():
        report.warnings.append(f"{entry}: not written by the store (never read or removed; move it elsewhere)")
    if not unreadable:
        for entry in store.objects.unreferenced(referenced):
            report.warnings.append(f"{entry}: no checkpoint references it (debris of a killed write; removed on open)")
    report.summary["objects"] = len(referenced)
    report.summary["live_batches"] = len(live)


__all__ = ["VerifyReport", "verify_store"]
