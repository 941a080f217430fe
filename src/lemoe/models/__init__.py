"""Model access: loading any causal LM and finding its editable parts.

Names are imported on first use (PEP 562), so ``lemoe.models.builtin`` and the command line's
``--help`` do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_MODEL": "lemoe.models.builtin",
    "MLPParts": "lemoe.models.access",
    "ModelAccess": "lemoe.models.access",
    "UnsupportedModelError": "lemoe.models.access",
    "weight_as_out_in": "lemoe.models.access",
    "cache_dir": "lemoe.models.loading",
    "load_model": "lemoe.models.loading",
}

if TYPE_CHECKING:
    from lemoe.models.access import MLPParts, ModelAccess, UnsupportedModelError, weight_as_out_in
    from lemoe.models.builtin import DEFAULT_MODEL
    from lemoe.models.loading import cache_dir, load_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lemoe.models' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "MLPParts",
    "ModelAccess",
    "UnsupportedModelError",
    "cache_dir",
    "load_model",
    "weight_as_out_in",
]
