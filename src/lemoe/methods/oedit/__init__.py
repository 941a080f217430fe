"""O-Edit / O-Edit+: orthogonal-subspace sequential editing (a documented GPM-style reconstruction)."""

from lemoe.methods.oedit.config import OEditConfig, OEditPlusConfig
from lemoe.methods.oedit.method import CapacityExhausted, CapacityWarning, OEdit, OEditPlus

__all__ = ["CapacityExhausted", "CapacityWarning", "OEdit", "OEditConfig", "OEditPlus", "OEditPlusConfig"]
