"""A benchmark matrix written down once: methods × data (× sizes) × protocols × seeds.

The file is TOML::

    model = "smollm2-135m"          # optional (the default model)
    out = "runs/small"              # output folder, relative to this file (``--out`` overrides)
    seeds = [0]                     # optional
    skip_probes = ["fluency"]       # optional, as ``lemoe run --skip-probe``
    pre = false                     # also score the unedited model on the edit set (default false)
    device = "cpu"                  # optional; cpus / gpus: what one cell needs (--executor ray
    cpus = 1                        #   schedules by them; a [[method]] may set its own)
    gpus = 0
    checkpoint_every = 25           # steps between a cell's checkpoints (resume granularity)

    [[method]]
    name = "ft-m"
    [[method]]
    name = "lemoe"
    label = "lemoe-30"              # needed when one method appears twice
    options = { steps = 30 }

    [[data]]
    spec = "zsre:sample"            # KIND:PATH, PATH relative to this file or "sample"
    edits = [10, 20]

    [[protocol]]
    edits_per_step = 10
    eval = "final"                  # final | every:K | immediate

Every cell is one ``lemoe run`` command; :func:`load_bench` checks the whole file (methods, their
options, data kinds and paths, protocols, duplicate outputs) before anything runs, and names the
place in the file of each problem.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = {
    *("model", "out", "seeds", "skip_probes", "pre", "batch_size", "method", "data", "protocol"),
    *("device", "cpus", "gpus", "checkpoint_every"),
}
METHOD_KEYS = {"name", "label", "options", "cpus", "gpus"}
DATA_KEYS = {"spec", "edits", "label", "zsre_target"}
PROTOCOL_KEYS = {"edits_per_step", "eval", "chunk", "order"}


class BenchConfigError(ValueError):
    """A benchmark file that cannot run; the message names the file and the place in it."""


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: what ``lemoe run`` is given, and where its record goes."""

    cell_id: str
    method: str
    options: dict[str, Any]
    data: str
    edits: int
    edits_per_step: int
    evaluate: str
    seed: int
    model: str
    chunk: int | None = None
    order: str = "given"
    zsre_target: str = "alt"
    skip_probes: tuple[str, ...] = ()
    pre: bool = False
    batch_size: int = 32
    device: str = "cpu"
    cpus: float = 1.0  # what the cell needs from an executor (Ray schedules by it)
    gpus: float = 0.0
    checkpoint_every: int = 25
    labels: dict[str, str] = field(default_factory=dict)  # method / data labels, for reports

    def run_args(self, out: Path, checkpoint: Path) -> list[str]:
        """The ``lemoe run`` arguments of this cell (its record's ``command``)."""
        args = ["run", "--model", self.model, "--method", self.method, "--data", self.data]
        args += ["--edits", str(self.edits), "--edits-per-step", str(self.edits_per_step)]
        args += ["--eval", self.evaluate, "--seed", str(self.seed), "--batch-size", str(self.batch_size)]
        if self.device != "cpu":
            args += ["--device", self.device]
        if self.checkpoint_every != 25:
            args += ["--checkpoint-every", str(self.checkpoint_every)]
        if self.chunk is not None:
            args += ["--chunk", str(self.chunk)]
        if self.order != "given":
            args += ["--order", self.order]
        if self.data.startswith("zsre:") and self.zsre_target != "alt":
            args += ["--zsre-target", self.zsre_target]
        for key, value in self.options.items():
            args += ["--opt", f"{key}={_json(value)}"]
        for kind in self.skip_probes:
            args += ["--skip-probe", kind]
        if not self.pre:
            args.append("--no-pre")
        return [*args, "--out", str(out), "--checkpoint", str(checkpoint)]  # progress bars: the runner's choice

    def command(self, out: Path, checkpoint: Path) -> str:
        return "lemoe " + shlex.join(self.run_args(out, checkpoint))

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": self.options,
            "data": self.data,
            "edits": self.edits,
            "edits_per_step": self.edits_per_step,
            "eval": self.evaluate,
            "chunk": self.chunk,
            "order": self.order,
            "seed": self.seed,
            "model": self.model,
            **self.labels,
        }


@dataclass(frozen=True)
class Bench:
    path: Path
    out: Path
    cells: list[Cell]


def _json(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "x"


def _table_list(doc: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    items = doc.get(key)
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise BenchConfigError(f"{where}: needs at least one [[{key}]] table")
    return items


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BenchConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(allowed)}")


def _positive_ints(value: Any, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise BenchConfigError(f"{where}: expected a positive integer or a list of them, got {value!r}")
    return values


def _resources(table: dict[str, Any], where: str, default: tuple[float, float]) -> tuple[float, float]:
    cpus, gpus = table.get("cpus", default[0]), table.get("gpus", default[1])
    for name, value in (("cpus", cpus), ("gpus", gpus)):
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise BenchConfigError(f"{where}.{name}: expected a number >= 0, got {value!r}")
    return float(cpus), float(gpus)


def _check_method(table: dict[str, Any], where: str) -> tuple[str, dict[str, Any], str]:
    from lemoe.methods import METHODS, get_method

    _check_keys(table, METHOD_KEYS, where)
    name = table.get("name")
    if name not in METHODS:
        raise BenchConfigError(f"{where}: unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise BenchConfigError(f"{where}.options: expected a table of option = value")
    try:
        get_method(name).config_class.from_dict(dict(options))
    except (TypeError, ValueError) as e:
        raise BenchConfigError(f"{where}.options: {e}") from None
    label = table.get("label", name)
    if not isinstance(label, str) or not label:
        raise BenchConfigError(f"{where}.label: expected a non-empty string")
    return name, dict(options), label


def _check_data(table: dict[str, Any], base: Path, where: str) -> tuple[str, list[int], str, str]:
    from lemoe.data import LOADERS, parse_data_spec, sample_path

    _check_keys(table, DATA_KEYS, where)
    spec = table.get("spec")
    if not isinstance(spec, str):
        raise BenchConfigError(f"{where}.spec: expected KIND:PATH")
    try:
        kind, path = parse_data_spec(spec)
    except ValueError as e:
        raise BenchConfigError(f"{where}.spec: {e}") from None
    if kind not in LOADERS:
        raise BenchConfigError(f"{where}.spec: unknown data kind {kind!r}; known: {', '.join(sorted(LOADERS))}")
    if path == "sample":
        try:
            sample_path(kind)
        except ValueError as e:
            raise BenchConfigError(f"{where}.spec: {e}") from None
        resolved, label = spec, f"{kind}-sample"
    else:
        file = Path(path) if Path(path).is_absolute() else (base / path)
        if not file.is_file():
            raise BenchConfigError(f"{where}.spec: no data file {file}")
        resolved, label = f"{kind}:{file.resolve()}", f"{kind}-{file.stem}"
    sizes = _positive_ints(table.get("edits"), f"{where}.edits")
    target = table.get("zsre_target", "alt")
    if target not in ("alt", "answer"):
        raise BenchConfigError(f"{where}.zsre_target: expected alt or answer")
    return resolved, sizes, str(table.get("label", label)), target


def _check_protocol(table: dict[str, Any], where: str) -> dict[str, Any]:
    from lemoe.runner.protocol import Protocol

    _check_keys(table, PROTOCOL_KEYS, where)
    values = {
        "edits_per_step": table.get("edits_per_step", 1),
        "evaluate": table.get("eval", "final"),
        "chunk": table.get("chunk"),
        "order": table.get("order", "given"),
    }
    if values["order"] not in ("given", "shuffle"):
        raise BenchConfigError(f"{where}.order: expected given or shuffle")
    try:
        Protocol(edits=max(values["chunk"] or 1, 1), **values)
    except (TypeError, ValueError) as e:
        raise BenchConfigError(f"{where}: {e}") from None
    return values


def load_bench(path: str | Path, out: str | Path | None = None) -> Bench:
    """Read and check a benchmark file; every cell it defines, or :class:`BenchConfigError`."""
    from lemoe.evaluation.kinds import ALL_PROBES
    from lemoe.models.builtin import DEFAULT_MODEL

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BenchConfigError(f"{path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise BenchConfigError(f"{path}: not valid TOML: {e}") from None
    where = str(path)
    _check_keys(doc, TOP_KEYS, where)
    base = path.resolve().parent
    model = doc.get("model", DEFAULT_MODEL)
    seeds = doc.get("seeds", [0])
    ints = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not ints or not seeds:
        raise BenchConfigError(f"{where}: seeds must be a non-empty list of integers")
    skip = doc.get("skip_probes", [])
    if not isinstance(skip, list) or any(k not in ALL_PROBES for k in skip):
        raise BenchConfigError(f"{where}: skip_probes must list probe kinds among {list(ALL_PROBES)}")
    pre = doc.get("pre", False)
    batch_size = doc.get("batch_size", 32)
    if not isinstance(pre, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BenchConfigError(f"{where}: pre must be true/false and batch_size a positive integer")
    out_dir = Path(out) if out is not None else doc.get("out")
    if out_dir is None:
        raise BenchConfigError(f'{where}: no output folder: set out = "..." in the file or pass --out')
    out_dir = (Path(out_dir) if Path(out_dir).is_absolute() or out is not None else base / out_dir).resolve()

    def tables(key: str) -> list[tuple[dict[str, Any], str]]:
        return [(t, f"{where}: [[{key}]] #{i + 1}") for i, t in enumerate(_table_list(doc, key, where))]

    device = doc.get("device", "cpu")
    every = doc.get("checkpoint_every", 25)
    if not isinstance(device, str) or not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise BenchConfigError(f"{where}: device must be a string and checkpoint_every a positive integer")
    default_resources = _resources(doc, where, (1.0, 0.0))
    methods = [_check_method(t, at) for t, at in tables("method")]
    resources = [_resources(t, at, default_resources) for t, at in tables("method")]
    data = [_check_data(t, base, at) for t, at in tables("data")]
    protocols = [_check_protocol(t, at) for t, at in tables("protocol")]
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for (name, options, mlabel), (cpus, gpus) in zip(methods, resources, strict=True):
        for spec, sizes, dlabel, target in data:
            for n in sizes:
                for p in protocols:
                    for seed in seeds:
                        parts = [mlabel, dlabel, f"n{n}", f"b{p['edits_per_step']}", p["evaluate"], f"s{seed}"]
                        if p["chunk"] is not None:
                            parts.insert(4, f"t{p['chunk']}")
                        if p["order"] != "given":
                            parts.insert(4, p["order"])
                        cell_id = ".".join(_slug(x) for x in parts)
                        what = f"{mlabel} × {dlabel} × {n} edits × {p} × seed {seed}"
                        if cell_id in seen:
                            raise BenchConfigError(
                                f"{where}: two cells would write {cell_id}.json ({seen[cell_id]}; {what}): "
                                "give the [[method]] or [[data]] tables distinct labels"
                            )
                        if p["chunk"] is not None and p["chunk"] > n:
                            raise BenchConfigError(f"{where}: chunk {p['chunk']} is larger than {n} edits ({what})")
                        seen[cell_id] = what
                        cells.append(
                            Cell(
                                cell_id=cell_id,
                                method=name,
                                options=options,
                                data=spec,
                                edits=n,
                                edits_per_step=p["edits_per_step"],
                                evaluate=p["evaluate"],
                                seed=seed,
                                model=model,
                                chunk=p["chunk"],
                                order=p["order"],
                                zsre_target=target,
                                skip_probes=tuple(skip),
                                pre=pre,
                                batch_size=batch_size,
                                device=device,
                                cpus=cpus,
                                gpus=gpus,
                                checkpoint_every=every,
                                labels={"method_label": mlabel, "data_label": dlabel},
                            )
                        )
    return Bench(path=path, out=out_dir, cells=cells)
