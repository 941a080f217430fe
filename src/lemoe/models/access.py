"""Which module is which, for any supported causal-LM architecture.

Editing methods need the same handful of places in every model: the token embedding, the list of
transformer blocks, and in each block the MLP with its input and output projections. Hugging Face
families name these differently, and GPT-2 stores its projections as ``Conv1D`` (weight laid out
``[in, out]``) instead of ``nn.Linear`` (``[out, in]``). This module finds them by walking the
model's structure and config — never by substrings of the model's name — and reports a clear error
naming what it could not find.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Layout = Literal["linear", "conv1d"]

# Attribute paths tried, in order, for each part. A path matches when every attribute exists.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma3 (text)
    "model.language_model.layers",  # Gemma3 multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)
_EMBED_PATHS = (
    "model.embed_tokens",
    "model.language_model.embed_tokens",
    "transformer.wte",
    "gpt_neox.embed_in",
    "model.decoder.embed_tokens",
)
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# (input projection(s), output projection) names inside an MLP module.
_MLP_PROJ_NAMES = (
    (("gate_proj", "up_proj"), "down_proj"),  # gated (Llama family)
    (("c_fc",), "c_proj"),  # GPT-2
    (("fc_in",), "fc_out"),  # GPT-J
    (("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX
)
# OPT keeps its MLP projections directly on the block.
_BLOCK_PROJ_NAMES = ((("fc1",), "fc2"),)


class UnsupportedModelError(ValueError):
    """The model's structure does not match any architecture lemoe knows how to edit."""


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.Module) else None


def projection_layout(module: nn.Module) -> Layout:
    """``linear`` for ``nn.Linear`` (weight ``[out, in]``), ``conv1d`` for GPT-2's ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    raise UnsupportedModelError(f"projection {type(module).__name__} is neither nn.Linear nor Conv1D")


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight viewed as ``[out_features, in_features]`` whatever its layout."""
    w = module.weight
    return w if projection_layout(module) == "linear" else w.T


@dataclass(frozen=True)
class MLPParts:
    """One block's MLP: the module, its input projections and its output projection."""

    mlp: nn.Module | None  # None where the block has no MLP module of its own (OPT)
    in_projs: tuple[nn.Module, ...]
    out_proj: nn.Module
    mlp_name: str  # dotted name of the MLP module inside the model
    out_proj_name: str  # dotted name of the output projection inside the model
    layout: Layout

    @property
    def input_module(self) -> nn.Module:
        """A module whose input is the MLP's input (hook it with a forward pre-hook)."""
        return self.in_projs[0]

    @property
    def hidden_size(self) -> int:
        return weight_as_out_in(self.out_proj).shape[0]

    @property
    def intermediate_size(self) -> int:
        return weight_as_out_in(self.out_proj).shape[1]


class ModelAccess:
    """Structural view of a causal LM: embedding, blocks and per-block MLP projections."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks_path, self.blocks = self._find_blocks(model)
        self.embed_path, self.embedding = self._find_embedding(model)
        self.mlps = [self._find_mlp(i, block) for i, block in enumerate(self.blocks)]
        n_config = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if n_config is None:
            n_config = getattr(getattr(model, "config", None), "n_layer", None)
        if n_config is not None and int(n_config) != len(self.blocks):
            raise UnsupportedModelError(
                f"config says {n_config} layers but {self.blocks_path} holds {len(self.blocks)}"
            )

    @staticmethod
    def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
        for path in _BLOCK_PATHS:
            mod = _get_path(model, path)
            if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                return path, mod
        raise UnsupportedModelError(
            f"{type(model).__name__}: no transformer block list found (tried {', '.join(_BLOCK_PATHS)})"
        )

    @staticmethod
    def _find_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
        for path in _EMBED_PATHS:
            mod = _get_path(model, path)
            if isinstance(mod, nn.Embedding):
                return path, mod
        get = getattr(model, "get_input_embeddings", None)
        mod = get() if callable(get) else None
        if isinstance(mod, nn.Embedding):
            for name, m in model.named_modules():
                if m is mod:
                    return name, mod
        raise UnsupportedModelError(f"{type(model).__name__}: no token embedding found")

    def _find_mlp(self, index: int, block: nn.Module) -> MLPParts:
        prefix = f"{self.blocks_path}.{index}"
        for mlp_name in _MLP_NAMES:
            mlp = getattr(block, mlp_name, None)
            if not isinstance(mlp, nn.Module):
                continue
            for in_names, out_name in _MLP_PROJ_NAMES:
                if all(hasattr(mlp, n) for n in in_names) and hasattr(mlp, out_name):
                    out = getattr(mlp, out_name)
                    return MLPParts(
                        mlp=mlp,
                        in_projs=tuple(getattr(mlp, n) for n in in_names),
                        out_proj=out,
                        mlp_name=f"{prefix}.{mlp_name}",
                        out_proj_name=f"{prefix}.{mlp_name}.{out_name}",
                        layout=projection_layout(out),
                    )
        for in_names, out_name in _BLOCK_PROJ_NAMES:
            if all(hasattr(block, n) for n in in_names) and hasattr(block, out_name):
                out = getattr(block, out_name)
                # OPT has no MLP module: its MLP is fc1 -> act -> fc2 on the block itself.
                return MLPParts(
                    mlp=None,
                    in_projs=tuple(getattr(block, n) for n in in_names),
                    out_proj=out,
                    mlp_name=prefix,
                    out_proj_name=f"{prefix}.{out_name}",
                    layout=projection_layout(out),
                )
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: block {index} has no MLP with known projections "
            f"(looked for {', '.join(_MLP_NAMES)} holding e.g. gate_proj/up_proj/down_proj, c_fc/c_proj, "
            "fc_in/fc_out, dense_h_to_4h/dense_4h_to_h, or fc1/fc2 on the block)"
        )

    # ----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.embedding.weight.shape[1]

    def mlp(self, layer: int) -> MLPParts:
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a {self.num_layers}-layer model")
        return self.mlps[layer]

    def default_edit_layer(self, fraction: float = 0.6) -> int:
        """A layer a bit past the middle (LEMoE's layer 18 of 32 is ~0.56)."""
        return min(self.num_layers - 1, round(fraction * (self.num_layers - 1)))

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype
