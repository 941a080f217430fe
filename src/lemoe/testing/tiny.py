"""Tiny random-initialised causal LMs, one per supported architecture family, built from configs.

They exercise the model-access layer and every method on the real Hugging Face module code of each
family without any download. Vocabulary size defaults to SmolLM2's, the size of the offline test tokenizer
(:func:`lemoe.testing.tiny_tokenizer`), so it or SmolLM2's tokenizer can drive them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as hf

SMOLLM2_VOCAB = 49152


def _llama_like(cfg_cls: type, **extra: object) -> Callable[[int], object]:
    def make(vocab: int) -> object:
        return cfg_cls(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
        )

    return make


FAMILIES: dict[str, Callable[[int], object]] = {
    "llama": _llama_like(hf.LlamaConfig),
    "mistral": _llama_like(hf.MistralConfig, sliding_window=None),
    "qwen2": _llama_like(hf.Qwen2Config),
    "gemma3": _llama_like(hf.Gemma3TextConfig, head_dim=16, sliding_window=64),
    "gpt2": lambda v: hf.GPT2Config(vocab_size=v, n_embd=64, n_layer=4, n_head=4, n_positions=256),
    "gptj": lambda v: hf.GPTJConfig(vocab_size=v, n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8),
    "gpt_neox": lambda v: hf.GPTNeoXConfig(
        vocab_size=v,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "opt": lambda v: hf.OPTConfig(
        vocab_size=v,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
}


def tiny_model(family: str, *, vocab_size: int = SMOLLM2_VOCAB, seed: int = 0) -> torch.nn.Module:
    """A 4-layer, 64-wide random model of ``family`` in eval mode with frozen parameters."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; have {sorted(FAMILIES)}")
    config = FAMILIES[family](vocab_size)
    torch.manual_seed(seed)
    model = hf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model
