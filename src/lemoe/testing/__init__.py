"""Helpers for tests and examples: tiny random-initialised models of every supported family."""

from lemoe.testing.tiny import FAMILIES, tiny_model

__all__ = ["FAMILIES", "tiny_model"]
