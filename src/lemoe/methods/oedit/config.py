"""Options of O-Edit / O-Edit+ (one config class; the two registry names differ only in ``mode``).

Every unknown of the paper (arXiv 2410.11469 published no code or equations) is an option here; the
defaults are the choices documented in :mod:`lemoe.methods.oedit.method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lemoe.data.loaders import LOADERS, iter_texts, sample_path
from lemoe.methods.base import MethodConfig

Mode = Literal["soft", "hard", "none"]
Side = Literal["in", "out"]
HardWhen = Literal["step", "final"]
KnowledgeSource = Literal["keys", "gradients", "none"]
CapacityPolicy = Literal["raise", "warn"]
Optimizer = Literal["adam", "sgd"]
UpdateSpace = Literal["keys", "full"]
KeyPositions = Literal["answer", "all"]


@dataclass
class OEditConfig(MethodConfig):
    # what is edited
    layers: list[int] | None = None  # MLP output projections edited; None: [ModelAccess.default_edit_layer()]
    # how updates are kept apart
    mode: Mode = "soft"  # soft: orthogonality penalty (O-Edit); hard: projection (O-Edit+); none: plain FT-M
    side: Side = "in"  # bases live in W_out's input (key) space, or in its output (value) space
    hard_when: HardWhen = "step"  # hard mode: project after every optimiser step, or once after the edit
    ortho_weight: float = 1.0  # soft mode: weight of the relative penalty ||P_B dW||^2 / ||dW||^2
    edit_energy: float = 0.9  # GPM threshold: B_e keeps the top singular vectors holding this energy of dW
    # pre-existing knowledge basis B_k
    knowledge_source: KnowledgeSource = "keys"  # keys (W_out inputs) or per-text NLL gradients, on knowledge_text
    knowledge_rank: int = 128  # q: rank of B_k (capped by knowledge_energy when that is set)
    knowledge_energy: float | None = None  # optional: smallest rank holding this covariance energy, <= q
    # text B_k is built from: "knowns" (the 200 packaged ROME knowns), "model" (passages sampled from the
    # model by the locate core's cached sampler), a text file (one passage a line) or a KIND:PATH data spec
    knowledge_text: str = "knowns"
    knowledge_samples: int | None = None  # knowns / passages used; None: all 200 knowns, 96 passages otherwise
    knowledge_max_tokens: int = 64  # passages only: tokens per passage (generated length for "model")
    cache_knowledge: bool = True  # cache the knowledge statistics under lemoe.models.cache_dir()/oedit
    # capacity
    max_rank_fraction: float = 0.95  # rank(B_k) + rank(B_e) may use at most this fraction of the space
    capacity_policy: CapacityPolicy = "warn"  # what happens once the bases are full (see method docstring)
    # optimisation (FT-M on the edit batch)
    update_space: UpdateSpace = "keys"  # keys: dW = A K^T, K = this batch's keys at the layer; full: any dW
    key_positions: KeyPositions = "answer"  # keys from the last prompt token and the target tokens, or all tokens
    optimizer: Optimizer = "adam"
    lr: float = 5e-2  # Adam step on A (keys); for update_space="full" use ~5e-4 as FT-M does
    steps: int = 25
    stop_accuracy: float = 1.0  # stop once every target token of the batch is predicted

    def __post_init__(self) -> None:
        choices = {
            "mode": ("soft", "hard", "none"),
            "side": ("in", "out"),
            "hard_when": ("step", "final"),
            "knowledge_source": ("keys", "gradients", "none"),
            "capacity_policy": ("raise", "warn"),
            "optimizer": ("adam", "sgd"),
            "update_space": ("keys", "full"),
            "key_positions": ("answer", "all"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"oedit: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if not self.layers or not all(isinstance(x, int) for x in self.layers):
                raise ValueError(f"oedit: layers must be a non-empty list of ints or null, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"oedit: layers has duplicates: {self.layers}")
        if not 0.0 < self.edit_energy <= 1.0:
            raise ValueError(f"oedit: edit_energy must be in (0, 1], got {self.edit_energy}")
        if self.knowledge_energy is not None and not 0.0 < self.knowledge_energy <= 1.0:
            raise ValueError(f"oedit: knowledge_energy must be in (0, 1] or null, got {self.knowledge_energy}")
        if self.knowledge_rank < 0:
            raise ValueError(f"oedit: knowledge_rank must be >= 0, got {self.knowledge_rank}")
        check_knowledge_text(self.knowledge_text)
        n, knowns = self.knowledge_samples, self.knowledge_text == "knowns"
        if n is not None and (not isinstance(n, int) or n < 1 or (knowns and n > 200)):
            bound = "in [1, 200] with knowledge_text='knowns'" if knowns else "an integer >= 1"
            raise ValueError(f"oedit: knowledge_samples must be {bound} or null, got {n!r}")
        if not isinstance(self.knowledge_max_tokens, int) or self.knowledge_max_tokens < 2:
            raise ValueError(f"oedit: knowledge_max_tokens must be an integer >= 2, got {self.knowledge_max_tokens!r}")
        if not 0.0 < self.max_rank_fraction <= 1.0:
            raise ValueError(f"oedit: max_rank_fraction must be in (0, 1], got {self.max_rank_fraction}")
        if self.ortho_weight < 0:
            raise ValueError(f"oedit: ortho_weight must be >= 0, got {self.ortho_weight}")
        if self.lr <= 0 or self.steps < 1:
            raise ValueError(f"oedit: need lr > 0 and steps >= 1, got lr={self.lr}, steps={self.steps}")
        if not 0.0 < self.stop_accuracy <= 1.0:
            raise ValueError(f"oedit: stop_accuracy must be in (0, 1], got {self.stop_accuracy}")

    @property
    def knowledge_count(self) -> int:
        """Knowns or passages B_k is built from: 200 knowns, or the locate core's 96 passages."""
        if self.knowledge_samples is not None:
            return self.knowledge_samples
        return 200 if self.knowledge_text == "knowns" else 96


def check_knowledge_text(value: object) -> None:
    """Raise ValueError unless ``value`` names usable text, without reading a model or a whole file:
    "knowns", "model", a text file holding a non-blank line, or ``KIND:PATH`` of a known dataset kind
    whose file exists (``KIND:sample`` for the packaged samples)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"oedit: knowledge_text must be 'knowns', 'model', a text file or KIND:PATH, got {value!r}")
    if value in ("knowns", "model"):
        return
    path = Path(value).expanduser()
    if path.is_file():
        try:
            next(iter(iter_texts(path)))
        except StopIteration:
            raise ValueError(f"oedit: knowledge_text file {value!r} holds no text") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"oedit: knowledge_text file {value!r} cannot be read ({e})") from None
        return
    kind, sep, rest = value.partition(":")
    if not sep or not rest or kind not in LOADERS:
        raise ValueError(
            f"oedit: knowledge_text {value!r} is neither 'knowns', 'model', an existing text file nor a "
            f"KIND:PATH data spec with KIND in {sorted(LOADERS)}"
        )
    if rest == "sample":
        try:
            sample_path(kind)
        except ValueError as e:
            raise ValueError(f"oedit: knowledge_text {value!r}: {e}") from None
    elif not Path(rest).is_file():  # load_spec reads the path as given
        raise ValueError(f"oedit: knowledge_text data spec {value!r}: no such file {rest!r}")


@dataclass
class OEditPlusConfig(OEditConfig):
    """O-Edit+: the same method with hard projection by default."""

    mode: Mode = "hard"
