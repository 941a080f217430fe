"""MALMEN: meta-learned massive editing with least-squares aggregation (and MEND-style summing)."""

from lemoe.methods.malmen.config import MALMENConfig
from lemoe.methods.malmen.method import MALMEN, MENDSum

__all__ = ["MALMEN", "MALMENConfig", "MENDSum"]
