"""Model access: loading any causal LM and finding its editable parts."""

from lemoe.models.access import MLPParts, ModelAccess, UnsupportedModelError, weight_as_out_in
from lemoe.models.loading import DEFAULT_MODEL, cache_dir, load_model

__all__ = [
    "DEFAULT_MODEL",
    "MLPParts",
    "ModelAccess",
    "UnsupportedModelError",
    "cache_dir",
    "load_model",
    "weight_as_out_in",
]
