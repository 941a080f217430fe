"""Shared fixtures. Tiny random models are fast; the real SmolLM2 model is loaded once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class ZsreSetup:
    """SmolLM2, the first packaged ZsRE samples, an evaluator and its unedited reference."""

    model: Any
    tokenizer: Any
    requests: list
    evaluator: Any
    reference: Any


@pytest.fixture(scope="session")
def smollm2_zsre(smollm2) -> ZsreSetup:
    """Set-up shared by the slow real-model edit tests: built once, before any of them edits.

    The reference is only valid for the unedited model, so every test using this fixture must
    restore the model (reset / detach) when it is done, as the tests do in ``finally``.
    """
    from lemoe.data import load_spec
    from lemoe.evaluation import Evaluator

    model, tok = smollm2
    requests, _ = load_spec("zsre:sample")
    requests = requests[:4]
    evaluator = Evaluator(model, tok, exact_match=False)
    return ZsreSetup(model, tok, requests, evaluator, evaluator.reference(requests))


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
