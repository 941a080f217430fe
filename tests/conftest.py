"""Shared fixtures and the rules every test run follows.

- Tiny random models with the offline tokenizer (``lemoe.testing.tiny_tokenizer``) are the fast
  tests: they need neither the real model nor the network.
- The real SmolLM2 model (``smollm2`` / ``smollm2_zsre``, loaded once per session) is for tests
  marked ``slow`` only; collection stops with an error on an unmarked one, and a fast test that
  reaches the built-in model any other way (e.g. the CLI's default model) fails at once.
- Each run gets its own ``LEMOE_CACHE`` (a temporary folder, removed afterwards), so no test reads
  or writes the user's ``~/.cache/lemoe``. The one exception is read-only: an already converted
  SmolLM2 in the user's cache is linked into the run's cache, so the slow tests do not convert it
  again (without one they convert it once per run, into the run's cache). Statistics the slow
  tests compute (covariances, sampled corpora) start empty each run; set ``LEMOE_TEST_CACHE`` to a
  folder of your own to keep them between runs.
- The Hugging Face libraries run offline (``HF_HUB_OFFLINE``), and pytest-timeout bounds every
  test (``timeout`` in pyproject.toml).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_MODEL_FIXTURES = ("smollm2", "smollm2_zsre")
# Per-test limits (pytest-timeout). Fast tests: `timeout` in pyproject.toml (300 s; the slowest takes
# about a minute on two busy cores). Slow tests: the first one to need them also samples the
# statistics corpus from the real model into the run's fresh cache (3-4 min on two busy cores), and
# the slowest takes 4.5-5 min in all there; 1,200 s leaves room for a slower machine, not a hang.
SLOW_TEST_TIMEOUT = 1200
_ENV_KEYS = ("LEMOE_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
_saved_env: dict[str, str | None] = {}
_run_cache: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Before collection: a per-run cache folder and offline Hugging Face libraries."""
    global _run_cache
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("pytest-timeout is not installed (tests could hang): run `make setup`")
    from lemoe.models.loading import BUILTIN_MODELS, cache_dir

    user_cache = cache_dir()  # where lemoe would write without this run's override
    _saved_env.update({k: os.environ.get(k) for k in _ENV_KEYS})
    kept = os.environ.get("LEMOE_TEST_CACHE")  # opt-in: a test cache kept between runs
    if kept:
        cache = Path(kept).expanduser().resolve()
        if cache == user_cache.expanduser().resolve():
            raise pytest.UsageError("LEMOE_TEST_CACHE must not be the user's lemoe cache")
        cache.mkdir(parents=True, exist_ok=True)
    else:
        cache = _run_cache = Path(tempfile.mkdtemp(prefix="lemoe-test-cache-"))
    for name in BUILTIN_MODELS:
        converted, link = user_cache / "models" / name, cache / "models" / name
        if link.exists() or link.is_symlink():
            continue
        if (converted / "config.json").exists() and any(converted.glob("*.safetensors")):
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(converted.resolve(), target_is_directory=True)
    os.environ["LEMOE_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_unconfigure(config: pytest.Config) -> None:
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _run_cache is not None:
        shutil.rmtree(_run_cache, ignore_errors=True)  # removes the links, never what they point to


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("slow") is None and set(REAL_MODEL_FIXTURES) & set(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that use the real model must be marked @pytest.mark.slow: " + ", ".join(unmarked)
        )
    for item in items:  # slow tests get the larger limit unless they set their own
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))


@pytest.fixture(autouse=True)
def _fast_tests_never_load_the_real_model(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast test that reaches the built-in model (say through the CLI's default) fails at once."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import lemoe.models.loading as loading

    def refuse(name: str) -> Path:
        raise AssertionError(f"a fast test tried to load the real model {name!r}: mark it @pytest.mark.slow")

    monkeypatch.setattr(loading, "builtin_model_path", refuse)


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
    """The offline tokenizer that drives the tiny random models (built in code, SmolLM2-shaped)."""
    from lemoe.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    from lemoe.testing import tiny_model

    return tiny_model("llama")


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tokenizer) -> Path:
    """A tiny random Llama and the offline tokenizer saved as a model folder (``--model DIR``)."""
    from lemoe.testing import tiny_model

    folder = tmp_path / "tiny-model"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
