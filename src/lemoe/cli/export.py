"""``lemoe export STATE_OR_STORE OUT``: an edited model for a serving engine (:mod:`lemoe.export`)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_export(args: argparse.Namespace) -> int:
    """Write an edited model for another engine (merged HF checkpoint, or base + adaptor state)."""
    from lemoe.export import export_edited

    info = export_edited(args.source, args.out, model=args.model, device=args.device)
    if info["kind"] == "merged":
        print(f"{args.out}: a Hugging Face checkpoint with the {info['method']} edits in its weights "
              "(transformers.AutoModelForCausalLM.from_pretrained loads it, no lemoe needed)")  # fmt: skip
    else:
        print(f"{args.out}: base {info['base_model']} + the {info['method']} adaptor; load it with "
              f"lemoe.load_edited({str(args.out)!r}) ({info['why_not_merged']})")  # fmt: skip
    return 0


def add_export_command(sub: Any) -> None:
    p = sub.add_parser("export", help="write an edited model for a serving engine", description=cmd_export.__doc__)
    p.add_argument("source", help="a saved method state (--save-state, store export) or an edit store")
    p.add_argument("out", help="a new or empty folder")
    p.add_argument("--model", default=None, help="the base model (default: the store's, else the default model)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_export)
