"""Shared fixtures. Tiny random models are fast; the real SmolLM2 model is loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The development data beside the checkout (../shared/data); tests using it skip without it."""
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model and tokenizer (converted once into the user cache)."""
    from lemoe.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, which also drives the tiny random models (same vocabulary size)."""
    from transformers import AutoTokenizer

    from lemoe.models.loading import builtin_model_path, prepare_tokenizer

    tok = AutoTokenizer.from_pretrained(builtin_model_path("smollm2-135m"))
    prepare_tokenizer(tok)
    return tok


@pytest.fixture
def tiny_llama():
    from lemoe.testing import tiny_model

    return tiny_model("llama")
