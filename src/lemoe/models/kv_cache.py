"""Which keyword a causal LM takes its KV cache under, across transformers versions.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name
still works, with a FutureWarning, and will go) and returns the cache as ``output.cache``. Code
that drives decoding by hand (the evaluator's greedy loop, LEMoE's routing hook) asks here
instead of hard-coding either name.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

NEW_KEYWORD = "cache"
OLD_KEYWORD = "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """``"cache"`` if the model's forward accepts it, else ``"past_key_values"``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a C-implemented or oddly wrapped forward
        return OLD_KEYWORD
    return NEW_KEYWORD if NEW_KEYWORD in params else OLD_KEYWORD


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned, under whichever attribute this version uses."""
    cache = getattr(output, NEW_KEYWORD, None)
    return cache if cache is not None else getattr(output, OLD_KEYWORD, None)


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call was given, under either keyword (for forward pre-hooks)."""
    cache = kwargs.get(NEW_KEYWORD)
    return cache if cache is not None else kwargs.get(OLD_KEYWORD)
