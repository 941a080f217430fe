"""Model access on every supported family, and the frozen-prefix reuse."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lemoe.models import ModelAccess, UnsupportedModelError, weight_as_out_in
from lemoe.models.frozen import hidden_before_block, skip_frozen_blocks
from lemoe.models.kv_cache import cache_keyword, passed_cache, returned_cache
from lemoe.testing import FAMILIES, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_access_finds_parts(family: str) -> None:
    model = tiny_model(family)
    access = ModelAccess(model)
    assert access.num_layers == 4
    assert access.hidden_size == 64
    assert access.embedding is model.get_input_embeddings()
    for layer in range(access.num_layers):
        parts = access.mlp(layer)
        w = weight_as_out_in(parts.out_proj)
        assert w.shape == (64, parts.intermediate_size)
        assert parts.intermediate_size in (128, 256)  # GPT-2/J default to 4x hidden
        assert dict(model.named_modules())[parts.out_proj_name] is parts.out_proj
    expected_layout = "conv1d" if family == "gpt2" else "linear"
    assert access.mlp(0).layout == expected_layout


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mlp_hook_points_see_mlp_input_and_output(family: str) -> None:
    """input_module's input and out_proj's output are the MLP's input/output on every family."""
    model = tiny_model(family)
    access = ModelAccess(model)
    parts = access.mlp(1)
    seen: dict[str, torch.Tensor] = {}
    h1 = parts.input_module.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    h2 = parts.out_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    model(input_ids=torch.tensor([[5, 6, 7]]))
    h1.remove()
    h2.remove()
    assert seen["in"].shape[-1] == 64 and seen["out"].shape[-1] == 64


def test_unsupported_model_error_names_what_is_missing() -> None:
    with pytest.raises(UnsupportedModelError, match="no transformer block list"):
        ModelAccess(nn.Sequential(nn.Linear(2, 2)))


def test_layer_out_of_range() -> None:
    access = ModelAccess(tiny_model("llama"))
    with pytest.raises(IndexError):
        access.mlp(4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_skip_frozen_blocks_gives_identical_logits(family: str) -> None:
    model = tiny_model(family)
    access = ModelAccess(model)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    hidden, tuple_out = hidden_before_block(access, 2, ids, mask)
    with skip_frozen_blocks(access, 2, hidden, tuple_out):
        fast = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(full, fast, atol=1e-5)
    # blocks are restored afterwards
    again = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(full, again)


@pytest.mark.slow
def test_default_model_loads_and_answers(smollm2) -> None:
    model, tok = smollm2
    access = ModelAccess(model)
    assert access.num_layers == 30 and access.hidden_size == 576
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1] :])


def test_load_model_from_local_folder(tmp_path, tokenizer) -> None:
    from lemoe.models import load_model

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok.pad_token_id is not None
    assert not any(p.requires_grad for p in loaded.parameters())


def test_cache_dir_is_explicit(monkeypatch, tmp_path) -> None:
    from lemoe.models import cache_dir

    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LEMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "lemoe"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_keyword_decodes_like_a_full_pass(family: str) -> None:
    """Token-by-token decoding under the keyword we pick matches one full pass, without the
    deprecation warning a renamed keyword raises."""
    model = tiny_model(family)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    kw = cache_keyword(model)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = model(input_ids=ids[:, :1], use_cache=True)
            steps = [out.logits]
            for t in range(1, ids.shape[1]):
                past = returned_cache(out)
                assert past is not None
                out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{kw: past})
                steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


def test_kv_cache_keyword_falls_back_to_past_key_values() -> None:
    class OldStyle(nn.Module):
        def forward(self, input_ids: object = None, past_key_values: object = None) -> object:
            return input_ids

    class Output:
        past_key_values = "old"

    assert cache_keyword(OldStyle()) == "past_key_values"
    assert returned_cache(Output()) == "old"
    assert passed_cache({"past_key_values": "old"}) == "old"
    assert passed_cache({"cache": "new", "past_key_values": None}) == "new"
