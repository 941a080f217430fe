"""Editing methods behind one interface (:class:`EditMethod`), looked up by name.

The table below is the registry: a constant map from name to ``module:Class``, imported on first
use, so importing lemoe loads no method module and registers nothing as a side effect. The base
classes are imported on first use too (PEP 562), so listing the names needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lemoe.methods.base import BatchReport, EditMethod, MethodConfig, StateError

_BASE_EXPORTS = ("BatchReport", "EditMethod", "MethodConfig", "StateError")


def __getattr__(name: str) -> Any:
    if name in _BASE_EXPORTS:
        return getattr(importlib.import_module("lemoe.methods.base"), name)
    raise AttributeError(f"module 'lemoe.methods' has no attribute {name!r}")


METHODS: dict[str, str] = {
    "ft-l": "lemoe.methods.ft:FTL",
    "ft-m": "lemoe.methods.ft:FTM",
    "memit": "lemoe.methods.memit:MEMIT",
    "alphaedit": "lemoe.methods.alphaedit.method:AlphaEdit",
    "coachhook": "lemoe.methods.coachhook.method:CoachHooK",
    "malmen": "lemoe.methods.malmen.method:MALMEN",
    "mend-sum": "lemoe.methods.malmen.method:MENDSum",
    "oedit": "lemoe.methods.oedit.method:OEdit",
    "oedit-plus": "lemoe.methods.oedit.method:OEditPlus",
    "lemoe": "lemoe.methods.lemoe.method:LEMoE",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[EditMethod]:
    """The method class registered under ``name``."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, model: object, tokenizer: object, options: dict | None = None) -> EditMethod:
    """Instantiate method ``name`` on ``model`` with config options given as a plain dict."""
    cls = get_method(name)
    config = cls.config_class.from_dict(options or {})
    return cls(model, tokenizer, config)


def load_method(directory: str, model: object, tokenizer: object) -> EditMethod:
    """Load a saved method state onto ``model``, whichever method wrote it."""
    from lemoe.methods.base import read_state_meta

    meta = read_state_meta(directory)
    return get_method(meta["method"]).from_pretrained(directory, model, tokenizer)


__all__ = [
    "METHODS",
    "BatchReport",
    "EditMethod",
    "MethodConfig",
    "StateError",
    "build_method",
    "get_method",
    "load_method",
    "method_names",
]
