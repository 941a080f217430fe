"""The command line's layering (issue 28, item 8): building the parser imports no heavy library and
the package has no import cycles through the CLI."""

from __future__ import annotations

import subprocess
import sys


def _imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print('\\n'.join(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return set(out.split())


def test_help_imports_no_torch_or_transformers() -> None:
    mods = _imported_after("from lemoe.cli import build_parser; p = build_parser(); p.format_help()")
    heavy = {m for m in mods if m.split(".")[0] in {"torch", "transformers", "numpy", "safetensors", "fcntl"}}
    assert heavy == set(), sorted(heavy)[:5]
    assert not any(m.startswith("lemoe.methods.") for m in mods)  # no method module either


def test_every_subcommand_help_works() -> None:
    from lemoe.cli import build_parser

    parser = build_parser()
    for argv in (["run", "-h"], ["eval", "-h"], ["train-editor", "-h"], ["store", "init", "-h"], ["serve", "-h"]):
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # argparse exits 0 after printing help
            assert e.code == 0, argv


def test_store_and_verify_import_in_either_order() -> None:
    """``store`` and ``verify`` no longer import each other: each module imports alone, in a fresh interpreter."""
    for first in ("lemoe.store.verify", "lemoe.store.store", "lemoe.store.journal", "lemoe.cli.store"):
        subprocess.run([sys.executable, "-c", f"import {first}"], check=True, timeout=120)
