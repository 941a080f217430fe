"""Helpers for tests and examples: tiny random-initialised models of every supported family, and an
offline tokenizer to drive them (no download, no real model)."""

from lemoe.testing.tiny import FAMILIES, tiny_model
from lemoe.testing.tokenizer import tiny_tokenizer

__all__ = ["FAMILIES", "tiny_model", "tiny_tokenizer"]
