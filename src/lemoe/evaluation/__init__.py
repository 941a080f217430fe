"""Evaluation: named scorers and the evaluator that aggregates them per metric.

Names are imported on first use (PEP 562): ``lemoe.evaluation.kinds`` stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ALL_PROBES": "lemoe.evaluation.kinds",
    "EvalResult": "lemoe.evaluation.evaluator",
    "Evaluator": "lemoe.evaluation.evaluator",
    "Reference": "lemoe.evaluation.evaluator",
    "ForwardContext": "lemoe.evaluation.scorers",
    "no_context": "lemoe.evaluation.scorers",
}

if TYPE_CHECKING:
    from lemoe.evaluation.evaluator import EvalResult, Evaluator, Reference
    from lemoe.evaluation.kinds import ALL_PROBES
    from lemoe.evaluation.scorers import ForwardContext, no_context


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lemoe.evaluation' has no attribute {name!r}")


__all__ = ["ALL_PROBES", "EvalResult", "Evaluator", "ForwardContext", "Reference", "no_context"]
