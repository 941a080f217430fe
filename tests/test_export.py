"""``lemoe export``: weight edits become a plain HF checkpoint; hook methods a base + adaptor pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lemoe
from lemoe.cli import main
from lemoe.methods import build_method
from lemoe.models import load_model
from lemoe.requests import EditRequest

EDITS = [
    EditRequest(prompt="The capital of Freedonia is", target_new="Quuxville"),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target_new="Klingon"),
]
PROMPTS = [e.prompt for e in EDITS] + ["How do bees make honey?"]


def _logits(model, tokenizer, context=None) -> torch.Tensor:
    from contextlib import nullcontext

    out = []
    for p in PROMPTS:  # one at a time: no padding question
        enc = tokenizer(p, return_tensors="pt")
        with torch.no_grad(), context(torch.ones_like(enc["input_ids"])) if context else nullcontext():
            out.append(model(**enc).logits[0, -1])
    return torch.stack(out)


def _edited_state(tiny_model_dir: Path, tmp_path: Path, method: str, options: dict) -> tuple[Path, torch.Tensor]:
    model, tokenizer = load_model(str(tiny_model_dir))
    edited = build_method(method, model, tokenizer, options)
    edited.apply(EDITS)
    state = edited.save_pretrained(tmp_path / f"{method}-state")
    return state, _logits(model, tokenizer, getattr(edited, "forward_context", None))


def test_a_weight_editing_method_exports_a_plain_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    state, want = _edited_state(tiny_model_dir, tmp_path, "ft-m", {"layer": 2, "steps": 10})
    out = tmp_path / "ft-export"
    assert main(["export", str(state), str(out), "--model", str(tiny_model_dir)]) == 0
    info = json.loads((out / "lemoe_export.json").read_text())
    assert info["kind"] == "merged" and info["method"] == "ft-m"
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers alone, no lemoe in the loop
    _, tokenizer = load_model(str(tiny_model_dir))
    got = _logits(plain.eval(), tokenizer)
    base, _ = load_model(str(tiny_model_dir))
    assert not torch.allclose(got, _logits(base, tokenizer))  # the edit is in the weights
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    model, _, method = lemoe.load_edited(out)
    assert method is None and torch.equal(_logits(model, tokenizer), got)


def test_a_hook_method_exports_base_plus_adaptor(tiny_model_dir: Path, tmp_path: Path) -> None:
    state, want = _edited_state(tiny_model_dir, tmp_path, "lemoe", {"layer": 2, "steps": 40, "train_chat": False})
    out = tmp_path / "lemoe-export"
    assert main(["export", str(state), str(out), "--model", str(tiny_model_dir)]) == 0
    info = json.loads((out / "lemoe_export.json").read_text())
    assert info["kind"] == "adaptor" and "per input" in info["why_not_merged"]
    assert (out / "adaptor" / "state.safetensors").is_file() and not list(out.glob("*.safetensors"))
    model, tokenizer, method = lemoe.load_edited(out)
    assert torch.equal(_logits(model, tokenizer, method.forward_context), want)


def test_export_refuses_what_it_cannot_export_and_writes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    state, _ = _edited_state(tiny_model_dir, tmp_path, "ft-m", {"layer": 2, "steps": 2})
    assert main(["export", str(state), str(tmp_path / "mine"), "--model", str(tiny_model_dir)]) == 2  # not empty
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert main(["export", str(tmp_path / "mine"), str(tmp_path / "o"), "--model", str(tiny_model_dir)]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="not a lemoe export"):
        lemoe.load_edited(tmp_path / "mine")
