"""``lemoe store init|edit|log|rollback|verify|export``: the durable edit store (:mod:`lemoe.store`)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from lemoe.cli.options import parse_option
from lemoe.models.builtin import DEFAULT_MODEL


def _fail(message: str) -> int:
    print(f"lemoe: error: {message}", file=sys.stderr)
    return 2


def cmd_init(args: argparse.Namespace) -> int:
    """Create a store for one base model and one method (default: LEMoE when available, else FT-M)."""
    from lemoe.store import EditStore

    with EditStore.init(
        args.store,
        model=args.model,
        method=args.method,
        options=dict(args.opt),
        edits_per_step=args.edits_per_step,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        device=args.device,
    ) as store:
        print(f"created store {store.root}: model {store.spec.model}, method {store.spec.method}")
    return 0


def _read_requests(args: argparse.Namespace) -> list[Any]:
    from lemoe.requests import InvalidRequestError
    from lemoe.store import parse_request

    if args.json:
        text = Path(args.json).read_text(encoding="utf-8")
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            try:
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"{args.json}: neither JSON nor JSON lines ({e})") from None
        if isinstance(items, dict):
            items = items.get("requests", [items])
        if not isinstance(items, list):
            raise InvalidRequestError(f"{args.json}: expected a list of request objects")
        return [parse_request(item, where=f"{args.json}[{i}]") for i, item in enumerate(items)]
    from lemoe.data import load_spec

    requests, _ = load_spec(args.data, zsre_target=args.zsre_target)
    end = args.offset + args.edits if args.edits else None
    return requests[args.offset : end]


def cmd_edit(args: argparse.Namespace) -> int:
    """Submit edits (validated, all or nothing) and apply every accepted edit in batches."""
    from lemoe.store import EditStore

    if not args.json and not args.data:
        return _fail("give --data KIND:PATH or --json FILE")
    requests = _read_requests(args)
    with EditStore.open(args.store, device=args.device) as store:
        done = store.submit(requests)
        new = sum(not d.duplicate for d in done)
        print(f"accepted {new} new edit(s), {len(done) - new} already in the store")
        if args.no_apply:
            return 0
        for batch in store.apply_pending():
            print(f"batch {batch.batch_id}: edits {batch.seqs} applied in {batch.seconds:.2f} s")
        counts = store.counts()
        print(f"store: {counts['applied']} applied, {counts['rolled_back']} rolled back, {counts['failed']} failed")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    """List edits in arrival order (no model is loaded)."""
    from lemoe.store import journal
    from lemoe.store.journal import open_readonly

    _spec, conn = open_readonly(args.store)
    try:
        rows = journal.list_edits(conn, status=args.status, after=args.after, limit=args.limit)
    finally:
        conn.close()
    if args.json:
        for r in rows:
            print(json.dumps(r.summary(), ensure_ascii=False))
        return 0
    print(f"{'seq':>6} {'batch':>6} {'status':12} {'submitted':19}  edit")
    for r in rows:
        req = json.loads(r.request)
        when = datetime.datetime.fromtimestamp(r.submitted_at).strftime("%Y-%m-%d %H:%M:%S")
        batch = "" if r.batch_id is None else str(r.batch_id)
        text = f"{req['prompt']!r} -> {req['target_new']!r}"
        print(f"{r.seq:>6} {batch:>6} {r.status:12} {when}  {text[:100]}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Undo one batch (--batch) or every batch after a point (--after; 0 = everything)."""
    from lemoe.methods.base import RollbackNotSupported
    from lemoe.store import EditStore

    with EditStore.open(args.store, device=args.device) as store:
        try:
            if args.batch is not None:
                undone = store.rollback([args.batch], replay=args.replay)
            else:
                undone = store.rollback_after(args.after, replay=args.replay)
        except RollbackNotSupported as e:
            return _fail(str(e))
        print(f"rolled back batch(es) {undone}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check identity, journal hashes, statuses and checkpoint files; exit 1 on any problem."""
    from lemoe.store import verify_store

    report = verify_store(args.store)
    print(report.format())
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    """Write the edited state (method save_pretrained folder + edits.jsonl) for another machine."""
    from lemoe.store import EditStore

    with EditStore.open(args.store, device=args.device) as store:
        out = store.export(args.out)
    print(f"exported to {out}; load it with `lemoe eval {out} --model {store.spec.model}`")
    return 0


def add_store_commands(subparsers: Any) -> None:
    """Add ``store`` with its subcommands to the ``lemoe`` command line."""

    store = subparsers.add_parser("store", help="a durable, resumable, reversible edit store")
    sub = store.add_subparsers(dest="store_command", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        p.add_argument("store", help="store directory")
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create a store")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--method", default=None, help="editing method (default: lemoe when registered, else ft-m)")
    p.add_argument("--opt", action="append", type=parse_option, default=[], metavar="KEY=VALUE", help="method option")
    p.add_argument("--edits-per-step", type=int, default=1, help="edits per applied batch")
    p.add_argument("--checkpoint-every", type=int, default=1, help="write a checkpoint every K batches")
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--device", default="cpu")

    p = add("edit", cmd_edit, "submit edits and apply them")
    p.add_argument("--data", default=None, help="KIND:PATH as for `lemoe run`")
    p.add_argument("--zsre-target", choices=["alt", "answer"], default="alt")
    p.add_argument("--edits", type=int, default=None, help="take N requests from --data")
    p.add_argument("--offset", type=int, default=0, help="skip the first K requests of --data")
    p.add_argument("--json", default=None, help="JSON list or JSON lines of request objects")
    p.add_argument("--no-apply", action="store_true", help="only accept; apply later")
    p.add_argument("--device", default="cpu")

    p = add("log", cmd_log, "list edits")
    p.add_argument("--status", default=None, choices=["accepted", "pending", "applied", "rolled_back", "failed"])
    p.add_argument("--after", type=int, default=0, help="edits with seq greater than this")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = add("rollback", cmd_rollback, "undo a batch or everything after a point")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--batch", type=int, help="the batch to undo")
    which.add_argument("--after", type=int, help="undo every batch after this one (0: all)")
    p.add_argument("--replay", action="store_true", help="for methods without rollback: rebuild by replaying")
    p.add_argument("--device", default="cpu")

    add("verify", cmd_verify, "check a store for corruption")

    p = add("export", cmd_export, "write the edited state for another machine")
    p.add_argument("out", help="new output directory")
    p.add_argument("--device", default="cpu")
