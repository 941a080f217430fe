"""AlphaEdit: null-space constrained locate-then-edit on the shared core."""

from lemoe.methods.alphaedit.config import AlphaEditConfig
from lemoe.methods.alphaedit.method import AlphaEdit, alphaedit_delta, nullspace_projection

__all__ = ["AlphaEdit", "AlphaEditConfig", "alphaedit_delta", "nullspace_projection"]
