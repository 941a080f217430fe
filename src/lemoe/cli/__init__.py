"""The ``lemoe`` command line, one module per family of commands.

Building the parser imports no torch, transformers or method module (``lemoe --help`` is fast):
each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from lemoe.cli.bench import add_bench_command
from lemoe.cli.export import add_export_command
from lemoe.cli.run import DEMO_EDITS, add_run_commands
from lemoe.cli.serve import add_serve_command
from lemoe.cli.store import add_store_commands
from lemoe.cli.train_editor import add_train_editor_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lemoe", description="Lifelong knowledge editing of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)  # run, demo, eval
    add_bench_command(sub)
    add_export_command(sub)
    add_train_editor_command(sub)
    add_store_commands(sub)
    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "lemoe " + shlex.join(sys.argv[1:] if argv is None else argv)  # for results records
    try:
        return int(args.func(args))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"lemoe: error: {e}", file=sys.stderr)
        return 2


__all__ = ["DEMO_EDITS", "build_parser", "main"]
