"""lemoe: lifelong knowledge editing of language models.

Import what you need from the subpackages: ``lemoe.models`` (loading, model access),
``lemoe.requests``, ``lemoe.data``, ``lemoe.methods``, ``lemoe.evaluation``, ``lemoe.runner``.
``lemoe.load_edited(folder)`` loads what ``lemoe export`` wrote. Importing lemoe has no side
effects (and imports no torch: ``load_edited`` is resolved on first use).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_edited":
        from lemoe.export import load_edited

        return load_edited
    raise AttributeError(f"module 'lemoe' has no attribute {name!r}")
