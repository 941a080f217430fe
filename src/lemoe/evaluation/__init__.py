"""Evaluation: named scorers and the evaluator that aggregates them per metric."""

from lemoe.evaluation.evaluator import ALL_PROBES, EvalResult, Evaluator, Reference
from lemoe.evaluation.scorers import ForwardContext, no_context

__all__ = ["ALL_PROBES", "EvalResult", "Evaluator", "ForwardContext", "Reference", "no_context"]
