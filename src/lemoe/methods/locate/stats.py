"""Second-moment statistics ``C0 = E[k kᵀ]`` of MLP keys over a text corpus, cached on disk.

Locate-then-edit methods protect what a layer already does by weighting their least-squares update
with ``C0``. The corpus must work offline: the default ("model") is text sampled from the model
itself from fixed starts (generated once, cached); a user text file (one passage a line) or any
dataset spec ``KIND:PATH`` (its prompts and targets) is accepted too. The statistics are cached at
``cache_dir()/stats/<model-fingerprint>/<layer>-<corpus-hash>.safetensors``: the corpus hash covers the
exact passages and the token limit, so a different corpus or sample size never hits a stale file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lemoe import fileio
from lemoe.batching import pad_id, pad_left, pad_right
from lemoe.models.access import ModelAccess
from lemoe.models.identity import model_fingerprint
from lemoe.models.loading import cache_dir

CORPUS_STARTS = (
    "The", "In", "A", "It", "This", "According to", "History", "Science", "The city of", "He was",
    "She is", "Many people", "In the year", "The company", "Music", "The river", "Scientists", "Today",
    "The government", "Football", "Born in", "The book", "Water", "During the war",
)  # fmt: skip


class StatsError(ValueError):
    """The statistics corpus cannot be read or is empty."""


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def stats_dir(fingerprint: dict[str, Any]) -> Path:
    """The cache folder of one base model's statistics (``fingerprint``: of the *unedited* model,
    ``EditMethod.base_fingerprint``, so a resumed, already edited method finds its base's files)."""
    return cache_dir() / "stats" / fingerprint_hash(fingerprint)


@torch.no_grad()
def model_corpus(
    model: nn.Module,
    tokenizer: object,
    samples: int,
    max_tokens: int,
    seed: int = 0,
    batch_size: int = 32,
    fingerprint: dict[str, Any] | None = None,
) -> list[str]:
    """Text sampled from the model (top-k 50) from fixed starts, cached beside the statistics.

    Sampling runs under a forked RNG, so the global random state is left untouched.
    """
    path = (
        stats_dir(fingerprint or model_fingerprint(model))
        / f"corpus-model-{samples}x{max_tokens}-seed{seed}-b{batch_size}.json"
    )
    if path.exists():
        return json.loads(path.read_text())
    device = next(model.parameters()).device
    starts = [CORPUS_STARTS[i % len(CORPUS_STARTS)] for i in range(samples)]
    texts: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in tqdm(range(0, samples, batch_size), desc="stats corpus (sampling from the model)", unit="batch"):
            chunk = starts[i : i + batch_size]
            enc = [tokenizer(s, add_special_tokens=True)["input_ids"] for s in chunk]  # type: ignore[operator]
            ids, mask = pad_left(enc, pad_id(tokenizer))  # generation continues every row at the end
            width = ids.shape[1]
            out = model.generate(  # type: ignore[attr-defined]
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                top_k=50,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=max_tokens,
                pad_token_id=pad_id(tokenizer),
            )
            texts.extend(
                s + tokenizer.decode(row, skip_special_tokens=True)  # type: ignore[attr-defined]
                for s, row in zip(chunk, out[:, width:], strict=True)
            )
    fileio.write_json(path, texts, indent=None)
    return texts


def load_corpus(
    spec: str,
    model: nn.Module,
    tokenizer: object,
    samples: int,
    max_tokens: int,
    seed: int = 0,
    batch_size: int = 32,
    fingerprint: dict[str, Any] | None = None,
) -> list[str]:
    """The passages named by ``spec``: "model", a text file, or a dataset spec ``KIND:PATH``."""
    if spec == "model":
        return model_corpus(model, tokenizer, samples, max_tokens, seed, batch_size, fingerprint)
    from lemoe.data.loaders import iter_texts, load_spec, parse_data_spec

    path = Path(spec).expanduser()
    if path.is_file():
        texts = []
        for line in iter_texts(path):
            texts.append(line)
            if len(texts) >= samples:
                break
    else:
        try:
            parse_data_spec(spec)
        except ValueError:
            raise StatsError(
                f"stats_corpus {spec!r} is neither 'model', a text file nor a KIND:PATH data spec"
            ) from None
        requests, _ = load_spec(spec)
        texts = [f"{r.prompt} {r.target_new}" for r in requests][:samples]
    if not texts:
        raise StatsError(f"stats corpus {spec!r} holds no text")
    return texts


def corpus_hash(texts: Sequence[str], max_tokens: int) -> str:
    h = hashlib.sha256(f"max_tokens={max_tokens}\n".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_second_moments(
    access: ModelAccess,
    tokenizer: object,
    layers: Sequence[int],
    texts: Sequence[str],
    max_tokens: int,
    batch_size: int,
) -> tuple[dict[int, torch.Tensor], int]:
    """``E[k kᵀ]`` (float64) of the out-projection inputs of ``layers`` over every real token."""
    d_in = {layer: access.mlp(layer).intermediate_size for layer in layers}
    sums = {layer: torch.zeros(d_in[layer], d_in[layer], dtype=torch.float64) for layer in layers}
    count = 0
    top = max(layers)
    state: dict[str, torch.Tensor] = {}

    def make_hook(layer: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            mask = state["mask"]
            x = args[0].reshape(*mask.shape, -1)  # OPT flattens tokens to [B*T, d]
            x = x[mask].double().cpu()
            sums[layer].addmm_(x.T, x)
            if layer == top:
                raise _Stop

        return hook

    handles = [access.mlp(layer).out_proj.register_forward_pre_hook(make_hook(layer)) for layer in layers]
    enc = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]  # type: ignore[operator]
    enc = [e for e in enc if len(e) > 1]
    try:
        for i in tqdm(
            range(0, len(enc), batch_size), desc=f"covariance statistics, layers {list(layers)}", unit="batch"
        ):
            ids, attn = pad_right(enc[i : i + batch_size], pad_id(tokenizer))
            mask = attn.bool()
            state["mask"] = mask.to(access.device)
            with contextlib.suppress(_Stop):
                access.model(input_ids=ids.to(access.device), attention_mask=attn.to(access.device), use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise StatsError("statistics corpus produced no tokens")
    return {layer: s / count for layer, s in sums.items()}, count


class _Stop(Exception):
    pass


def layer_stats(
    model: nn.Module,
    access: ModelAccess,
    tokenizer: object,
    layers: Sequence[int],
    corpus: str = "model",
    samples: int = 96,
    max_tokens: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    fingerprint: dict[str, Any] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``C0`` per layer (float64) and a report: which layers hit the cache, seconds spent.

    Must run on the unedited model (the methods call it before their first edit).
    """
    start = time.perf_counter()
    fingerprint = fingerprint or model_fingerprint(model)
    texts = load_corpus(corpus, model, tokenizer, samples, max_tokens, seed, batch_size, fingerprint)
    key = corpus_hash(texts, max_tokens)
    folder = stats_dir(fingerprint)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = folder / f"{layer}-{key}.safetensors"
        try:  # missing or unreadable: recomputed below
            out[layer] = load_file(str(path))["mom2"]
        except Exception:  # safetensors raises several error types on corrupt files
            missing.append(layer)
    tokens = 0
    if missing:
        fresh, tokens = collect_second_moments(access, tokenizer, missing, texts, max_tokens, batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        for layer, mom2 in fresh.items():
            path = folder / f"{layer}-{key}.safetensors"
            meta = {"tokens": str(tokens), "corpus": corpus, "corpus_hash": key}
            with fileio.atomic_path(path) as tmp:
                save_file({"mom2": mom2.contiguous()}, str(tmp), metadata=meta)
            out[layer] = mom2
    report = {
        "stats_seconds": time.perf_counter() - start,
        "stats_cached_layers": [layer for layer in layers if layer not in missing],
        "stats_computed_layers": missing,
        "stats_tokens": tokens,
        "stats_corpus_hash": key,
    }
    return out, report
