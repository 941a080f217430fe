"""Evaluation: named scorers and the evaluator that aggregates them per metric."""

from lemoe.evaluation.evaluator import EvalResult, Evaluator, Reference
from lemoe.evaluation.scorers import ForwardContext, no_context

__all__ = ["EvalResult", "Evaluator", "ForwardContext", "Reference", "no_context"]
