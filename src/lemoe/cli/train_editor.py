"""``lemoe train-editor``: meta-train a MALMEN / MEND-sum editor (:mod:`lemoe.methods.malmen.train`)."""

from __future__ import annotations

import argparse
from typing import Any


def parse_range(text: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected START:STOP, got {text!r}")
    return int(a), int(b)


DESCRIPTION = "Meta-training of the MALMEN / MEND-sum editor, with progress, validation, checkpoints and resume."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's options, defined once for ``lemoe train-editor`` and ``python -m lemoe.cli.train_editor``."""
    p.add_argument("--out", required=True, help="output folder: editor/, best/, trainer.json(+.tensors), log.jsonl")
    p.add_argument(
        "--method",
        choices=["malmen", "mend-sum"],
        default="malmen",
        help="aggregation the editor is trained for: least squares (malmen) or summed shifts (mend-sum)",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--counterfact", required=True, help="CounterFact TRAIN split (simplified format)")
    p.add_argument("--val-size", type=int, default=64, help="edits held out from the end of CounterFact train")
    p.add_argument("--zsre", default=None, help="optional ZsRE (MEND format) file to add to training")
    p.add_argument("--zsre-range", type=parse_range, default=(300, 500), help="records of --zsre used (START:STOP)")
    p.add_argument("--steps", type=int, default=100, help="total meta-steps")
    p.add_argument("--edits-per-step", type=int, default=16)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from DIR/trainer.json")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="MALMENConfig option")
    p.add_argument("--device", default="cpu")


def cmd_train_editor(args: argparse.Namespace) -> int:
    from lemoe.methods.malmen.train import train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    return train(argparse.Namespace(**options))


def add_train_editor_command(sub: Any) -> None:
    te = sub.add_parser(
        "train-editor",
        help="meta-train a MALMEN / MEND-sum editor (validation, checkpoints, --resume)",
        description=DESCRIPTION,
    )
    add_arguments(te)
    te.set_defaults(func=cmd_train_editor)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lemoe.cli.train_editor", description=DESCRIPTION)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from lemoe.methods.malmen.train import train

    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
