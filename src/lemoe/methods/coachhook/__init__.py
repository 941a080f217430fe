"""CoachHooK (COMEBA-HK): consecutive batch editing in hook layers."""

from lemoe.methods.coachhook.config import CoachHooKConfig
from lemoe.methods.coachhook.hooks import HookLayer, MaskSource, zscores
from lemoe.methods.coachhook.method import CoachHooK

__all__ = ["CoachHooK", "CoachHooKConfig", "HookLayer", "MaskSource", "zscores"]
