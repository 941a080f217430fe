"""AlphaEdit options: the locate-then-edit core's plus the null-space projection."""

from __future__ import annotations

from dataclasses import dataclass

from lemoe.methods.locate.config import LocateConfig


@dataclass
class AlphaEditConfig(LocateConfig):
    # Directions of C0 with eigenvalue below this are the null space of preserved knowledge.
    # Relative to C0's largest eigenvalue when ``nullspace_relative`` (scale-free across models);
    # the paper's absolute 2e-2 assumes its models' key scale.
    nullspace_threshold: float = 2e-2
    nullspace_relative: bool = False
    l2: float = 10.0  # ridge term of AlphaEdit's solve (its Llama3 setting)

    def validate(self) -> None:
        super().validate()
        if not self.nullspace_threshold > 0:
            raise ValueError(f"nullspace_threshold must be positive, got {self.nullspace_threshold!r}")
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2!r}")
        if not isinstance(self.nullspace_relative, bool):
            raise ValueError(f"nullspace_relative must be true or false, got {self.nullspace_relative!r}")
