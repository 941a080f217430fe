"""The lifelong edit store: a durable, resumable, reversible home for an editing method's state.

``EditStore.init(dir, model=..., method=...)`` creates one; ``EditStore.open(dir)`` verifies and
recovers it; ``submit`` + ``apply_pending`` edit; ``rollback``/``rollback_after`` undo;
``export`` writes the state for another machine; ``verify_store`` checks a store without
changing it. See ``store.py`` for the write order that makes it crash safe.
"""

from lemoe.store.journal import open_readonly
from lemoe.store.spec import StoreCorruptError, StoreError, StoreMismatchError, StoreSpec
from lemoe.store.store import (
    AppliedBatch,
    DuplicateEditError,
    EditStore,
    StoreBusyError,
    Submitted,
    default_method,
)
from lemoe.store.validate import parse_request, parse_submission
from lemoe.store.verify import VerifyReport, verify_store

__all__ = [
    "AppliedBatch",
    "DuplicateEditError",
    "EditStore",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "StoreSpec",
    "Submitted",
    "VerifyReport",
    "default_method",
    "open_readonly",
    "parse_request",
    "parse_submission",
    "verify_store",
]
