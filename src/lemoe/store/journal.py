"""The edit journal: one SQLite file with every accepted request, its batch, status and hashes.

Tables:

- ``edits``: one row per accepted request, in arrival order (``seq``). ``content_hash`` is the
  sha256 of the canonical request JSON; ``chain`` links each row to the previous one, so editing,
  deleting or reordering rows is detectable by ``verify``.
- ``batches``: the unit the method applies. A batch is created (``pending``) with its edits *before*
  the method sees it, so a crash mid-batch replays exactly the same batch on reopen.
- ``checkpoints``: method states on disk, each with the ordered list of batches whose effect it
  holds and the checksums of its files. A checkpoint row is committed only after its files are
  durable, in the same transaction as the status change it records.

Statuses: an edit is ``accepted`` (queued), ``pending`` (in a batch being applied), ``applied``,
``rolled_back`` or ``failed`` (its batch raised); a batch is ``pending``, ``applied``,
``rolled_back`` or ``failed``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lemoe.requests import EditRequest
from lemoe.store.spec import (
    JOURNAL_FILE,
    StoreCorruptError,
    StoreMismatchError,
    StoreSpec,
    canonical_json,
    checkpoint_dirname,
    read_spec,
    sha256_text,
)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    request TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    chain TEXT NOT NULL,
    status TEXT NOT NULL,
    batch_id INTEGER,
    submitted_at REAL NOT NULL,
    applied_at REAL,
    rolled_back_at REAL
);
CREATE INDEX IF NOT EXISTS edits_status ON edits(status, seq);
CREATE INDEX IF NOT EXISTS edits_request_id ON edits(request_id);
CREATE INDEX IF NOT EXISTS edits_batch ON edits(batch_id);
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    method_index INTEGER,
    created_at REAL NOT NULL,
    applied_at REAL,
    rolled_back_at REAL,
    info TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    ckpt_id INTEGER PRIMARY KEY,
    dirname TEXT NOT NULL,
    batches TEXT NOT NULL,
    edits_digest TEXT NOT NULL,
    state_sha256 TEXT NOT NULL,
    config_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

EDIT_STATUSES = ("accepted", "pending", "applied", "rolled_back", "failed")
BATCH_STATUSES = ("pending", "applied", "rolled_back", "failed")


@dataclass(frozen=True)
class EditRow:
    seq: int
    request_id: str
    request: str
    content_hash: str
    chain: str
    status: str
    batch_id: int | None
    submitted_at: float
    applied_at: float | None
    rolled_back_at: float | None

    def to_request(self) -> EditRequest:
        return EditRequest.from_dict(json.loads(self.request), where=f"edit {self.seq}")

    def summary(self) -> dict[str, Any]:
        """What the log and the service show (the request itself, not the hashes)."""
        return {
            "seq": self.seq,
            "request_id": self.request_id,
            "status": self.status,
            "batch": self.batch_id,
            "submitted_at": self.submitted_at,
            "applied_at": self.applied_at,
            "rolled_back_at": self.rolled_back_at,
            "request": json.loads(self.request),
        }


@dataclass(frozen=True)
class BatchRow:
    batch_id: int
    status: str
    method_index: int | None
    created_at: float
    applied_at: float | None
    rolled_back_at: float | None
    info: str | None


@dataclass(frozen=True)
class CheckpointRow:
    ckpt_id: int
    dirname: str
    batches: tuple[int, ...]
    edits_digest: str
    state_sha256: str
    config_sha256: str
    created_at: float


def connect(path: Path) -> sqlite3.Connection:
    """Open the journal: WAL (readers never block the writer), full fsync on every commit."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic, durable transaction (BEGIN IMMEDIATE takes the write lock up front)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_schema(conn: sqlite3.Connection, store_id: str, spec_sha256: str) -> None:
    with transaction(conn):
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [("schema_version", str(SCHEMA_VERSION)), ("store_id", store_id), ("spec_sha256", spec_sha256)],
        )


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as e:
        raise StoreCorruptError(f"journal is not readable ({e})") from None


def chain_start(store_id: str) -> str:
    return sha256_text("lemoe-store:" + store_id)


def next_chain(previous: str, content_hash: str) -> str:
    return sha256_text(previous + content_hash)


def request_json(request: EditRequest) -> str:
    return canonical_json(request.to_dict())


# -- edits -----------------------------------------------------------------------------------------


def last_chain(conn: sqlite3.Connection, store_id: str) -> str:
    row = conn.execute("SELECT chain FROM edits ORDER BY seq DESC LIMIT 1").fetchone()
    return row[0] if row else chain_start(store_id)


def find_live_edit(conn: sqlite3.Connection, request_id: str) -> EditRow | None:
    """The edit with this request id that is not rolled back or failed (at most one exists)."""
    row = conn.execute(
        "SELECT * FROM edits WHERE request_id = ? AND status NOT IN ('rolled_back', 'failed') ORDER BY seq LIMIT 1",
        (request_id,),
    ).fetchone()
    return EditRow(*row) if row else None


def insert_edits(conn: sqlite3.Connection, store_id: str, requests: Sequence[EditRequest], now: float) -> list[int]:
    """Append accepted requests (inside the caller's transaction); return their seq numbers."""
    chain = last_chain(conn, store_id)
    seqs = []
    for r in requests:
        text = request_json(r)
        digest = sha256_text(text)
        chain = next_chain(chain, digest)
        cur = conn.execute(
            "INSERT INTO edits(request_id, request, content_hash, chain, status, submitted_at) VALUES (?,?,?,?,?,?)",
            (r.request_id, text, digest, chain, "accepted", now),
        )
        seqs.append(int(cur.lastrowid))  # type: ignore[arg-type]
    return seqs


def get_edit(conn: sqlite3.Connection, seq: int) -> EditRow | None:
    row = conn.execute("SELECT * FROM edits WHERE seq = ?", (seq,)).fetchone()
    return EditRow(*row) if row else None


def list_edits(
    conn: sqlite3.Connection,
    *,
    status: str | None = None,
    batch_id: int | None = None,
    after: int = 0,
    limit: int | None = None,
) -> list[EditRow]:
    sql, args = "SELECT * FROM edits WHERE seq > ?", [after]
    if status is not None:
        sql += " AND status = ?"
        args.append(status)
    if batch_id is not None:
        sql += " AND batch_id = ?"
        args.append(batch_id)
    sql += " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return [EditRow(*r) for r in conn.execute(sql, args).fetchall()]


def count_edits(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT status, COUNT(*) FROM edits GROUP BY status").fetchall()
    return {s: 0 for s in EDIT_STATUSES} | dict(rows)


# -- batches ---------------------------------------------------------------------------------------


def create_batch(conn: sqlite3.Connection, seqs: Sequence[int], now: float) -> int:
    cur = conn.execute("INSERT INTO batches(status, created_at) VALUES ('pending', ?)", (now,))
    batch_id = int(cur.lastrowid)  # type: ignore[arg-type]
    conn.executemany(
        "UPDATE edits SET status = 'pending', batch_id = ? WHERE seq = ? AND status = 'accepted'",
        [(batch_id, s) for s in seqs],
    )
    return batch_id


def set_batch_status(
    conn: sqlite3.Connection,
    batch_id: int,
    status: str,
    now: float,
    *,
    method_index: int | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Move a batch and all its edits to ``status`` (inside the caller's transaction)."""
    # The first time a batch is applied counts (a replay after a crash keeps the original time).
    column = {"applied": "applied_at", "rolled_back": "rolled_back_at"}.get(status)
    sets = "status = ?" + (f", {column} = COALESCE({column}, ?)" if column else "")
    args: list[Any] = [status] + ([now] if column else [])
    extra = ""
    if method_index is not None:
        extra += ", method_index = ?"
        args.append(method_index)
    if info is not None:
        extra += ", info = ?"
        args.append(json.dumps(info, default=str))
    conn.execute(f"UPDATE batches SET {sets}{extra} WHERE batch_id = ?", [*args, batch_id])
    conn.execute(f"UPDATE edits SET {sets} WHERE batch_id = ?", [status] + ([now] if column else []) + [batch_id])


def get_batch(conn: sqlite3.Connection, batch_id: int) -> BatchRow | None:
    row = conn.execute("SELECT * FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
    return BatchRow(*row) if row else None


def list_batches(conn: sqlite3.Connection, status: str | None = None) -> list[BatchRow]:
    if status is None:
        rows = conn.execute("SELECT * FROM batches ORDER BY batch_id").fetchall()
    else:
        rows = conn.execute("SELECT * FROM batches WHERE status = ? ORDER BY batch_id", (status,)).fetchall()
    return [BatchRow(*r) for r in rows]


def live_batches(conn: sqlite3.Connection) -> list[int]:
    """Batches whose effect the model must hold, in the order they were applied."""
    rows = conn.execute("SELECT batch_id FROM batches WHERE status IN ('applied', 'pending') ORDER BY batch_id")
    return [int(r[0]) for r in rows.fetchall()]


def batch_requests(conn: sqlite3.Connection, batch_id: int) -> list[EditRequest]:
    return [e.to_request() for e in list_edits(conn, batch_id=batch_id)]


# -- checkpoints -----------------------------------------------------------------------------------


MAX_BATCH_LIST = 10_000_000  # a batch list read from the store may not expand beyond this


def encode_batches(batches: Sequence[int]) -> list[Any]:
    """A batch list as written to the journal and manifests: runs of consecutive ids as ``[first,
    last]`` pairs, other ids as themselves, so a stream without rollbacks takes one pair whatever
    its length (a plain list of ints, the older form, is read the same way)."""
    out: list[Any] = []
    i = 0
    while i < len(batches):
        j = i
        while j + 1 < len(batches) and batches[j + 1] == batches[j] + 1:
            j += 1
        out.append([int(batches[i]), int(batches[j])] if j > i else int(batches[i]))
        i = j + 1
    return out


def decode_batches(value: Any, where: str) -> tuple[int, ...]:
    """Inverse of :func:`encode_batches` for untrusted input (bounded, ints only)."""
    if not isinstance(value, list):
        raise StoreCorruptError(f"{where}: batch list is not a list")
    out: list[int] = []
    for item in value:
        if type(item) is int:
            out.append(item)
        elif isinstance(item, list) and len(item) == 2 and all(type(x) is int for x in item) and item[0] < item[1]:
            if len(out) + item[1] - item[0] >= MAX_BATCH_LIST:
                raise StoreCorruptError(f"{where}: batch list longer than {MAX_BATCH_LIST}")
            out.extend(range(item[0], item[1] + 1))
        else:
            raise StoreCorruptError(f"{where}: malformed batch list entry {str(item)[:40]!r}")
    return tuple(out)


def edits_digest(conn: sqlite3.Connection, batches: Sequence[int]) -> str:
    """Digest of the (seq, content hash) of every edit in ``batches``: ties a checkpoint to its edits.
    One query (not one per batch); the pairs are ordered by the batch list, then by seq."""
    wanted = set(batches)
    by_batch: dict[int, list[list[Any]]] = {}
    rows = conn.execute("SELECT batch_id, seq, content_hash FROM edits WHERE batch_id IS NOT NULL ORDER BY seq")
    for b, seq, digest in rows:
        if b in wanted:
            by_batch.setdefault(b, []).append([seq, digest])
    pairs = [p for b in batches for p in by_batch.get(b, [])]
    return sha256_text(canonical_json(pairs))


def next_checkpoint_id(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MAX(ckpt_id) FROM checkpoints").fetchone()
    return int(row[0] or 0) + 1


def insert_checkpoint(conn: sqlite3.Connection, row: CheckpointRow) -> None:
    conn.execute(
        "INSERT INTO checkpoints VALUES (?,?,?,?,?,?,?)",
        (
            row.ckpt_id,
            row.dirname,
            json.dumps(encode_batches(list(row.batches))),
            row.edits_digest,
            row.state_sha256,
            row.config_sha256,
            row.created_at,
        ),
    )


def list_checkpoints(conn: sqlite3.Connection) -> list[CheckpointRow]:
    """All checkpoints, newest first. A row whose folder name is not the one its id gives is refused:
    the journal is read as untrusted input, so no path from it can leave ``checkpoints/``."""
    out = []
    for r in conn.execute("SELECT * FROM checkpoints ORDER BY ckpt_id DESC").fetchall():
        expected = checkpoint_dirname(r[0])
        if r[1] != expected:
            raise StoreCorruptError(
                f"journal: checkpoint {r[0]} names folder {r[1]!r}, not {expected!r}; the journal was changed "
                "outside lemoe, so nothing was read or removed (restore the store from a backup)"
            )
        try:
            batches = decode_batches(json.loads(r[2]), f"journal: checkpoint {r[0]}")
        except (ValueError, TypeError) as e:
            raise StoreCorruptError(f"journal: checkpoint {r[0]} has a corrupt batch list ({e})") from None
        for value in r[3:6]:
            if not isinstance(value, str) or len(value) != 64:
                raise StoreCorruptError(f"journal: checkpoint {r[0]} has a malformed checksum or digest")
        out.append(CheckpointRow(r[0], r[1], batches, r[3], r[4], r[5], r[6]))
    return out


def delete_checkpoints(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    conn.executemany("DELETE FROM checkpoints WHERE ckpt_id = ?", [(i,) for i in ids])


def now() -> float:
    return time.time()


def check_identity(root: Path, spec: StoreSpec, spec_sha: str) -> None:
    """The journal exists, has this schema, and belongs to this ``store.json`` (id and hash)."""
    path = root / JOURNAL_FILE
    if not path.is_file():
        raise StoreCorruptError(f"{path}: journal is missing")
    conn = connect(path)
    try:
        meta = read_meta(conn)
    finally:
        conn.close()
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        found = meta.get("schema_version")
        raise StoreMismatchError(f"{path}: journal schema {found!r}, expected {SCHEMA_VERSION}")
    if meta.get("store_id") != spec.store_id or meta.get("spec_sha256") != spec_sha:
        raise StoreCorruptError(f"{root}: store.json does not match the journal (changed or from another store)")


def open_readonly(root: str | Path) -> tuple[StoreSpec, Any]:
    """The spec and a journal connection, without loading a model or taking the writer lock."""
    root = Path(root)
    spec, spec_sha = read_spec(root)
    check_identity(root, spec, spec_sha)
    return spec, connect(root / JOURNAL_FILE)
