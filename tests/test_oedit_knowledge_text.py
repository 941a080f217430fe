"""O-Edit's ``knowledge_text``: B_k from the knowns, model-sampled passages or user text.

Every value must give a B_k of the requested rank, orthonormal, kept apart from B_e; different texts
must never share a knowledge cache entry; bad values must raise before the model or cache is touched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lemoe.data.knowns import KNOWNS
from lemoe.methods import build_method, load_method
from lemoe.methods.oedit import knowledge, subspace
from lemoe.methods.oedit.knowledge import KnownsText, PassagesText, knowledge_cache_path
from lemoe.models.access import weight_as_out_in
from lemoe.models.identity import model_fingerprint
from lemoe.requests import EditRequest
from lemoe.testing import tiny_model

RANK = 8
# small passages keep the tiny-model sampler and statistics fast
FAST = {"knowledge_rank": RANK, "knowledge_samples": 6, "knowledge_max_tokens": 16, "steps": 6}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private lemoe cache, so model-sampled passages and statistics never leak between tests."""
    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _text_file(tmp_path: Path, name: str = "texts.txt", offset: int = 0) -> str:
    lines = [f"Passage {i + offset} says that the river flows past the old mill every spring." for i in range(8)]
    path = tmp_path / name
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line is skipped
    return str(path)


def _requests(n: int) -> list[EditRequest]:
    return [EditRequest(prompt=f"The pet of person {i} is a", target_new=f"cat {i}") for i in range(n)]


def _orthonormal_error(b: torch.Tensor) -> float:
    return float((b.T @ b - torch.eye(b.shape[1])).abs().max()) if b.shape[1] else 0.0


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("knowns", "keys"),
        ("model", "keys"),
        ("model", "gradients"),
        ("FILE", "keys"),
        ("FILE", "gradients"),
        ("zsre:sample", "keys"),
    ],
)
def test_every_text_builds_an_orthonormal_basis_of_the_requested_rank(tokenizer, cache, tmp_path, text, source) -> None:
    text = _text_file(tmp_path) if text == "FILE" else text
    method = build_method(
        "oedit-plus", tiny_model("llama"), tokenizer, {**FAST, "knowledge_text": text, "knowledge_source": source}
    )
    method.ensure_knowledge()
    b_k = method.knowledge[0].clone()
    assert b_k.shape == (method.dims[0], RANK)
    assert _orthonormal_error(b_k) < 1e-4
    assert method.knowledge_info["knowledge_text"] == text
    for req in _requests(3):
        w0 = weight_as_out_in(method.modules[0]).detach().clone()
        basis = method.basis(0).clone()
        method.apply([req])
        update = weight_as_out_in(method.modules[0]).detach() - w0
        assert float(subspace.component_in(update, basis, "in").norm()) <= 1e-4 * float(update.norm())
    assert torch.equal(method.knowledge[0], b_k)  # B_k comes first and stays
    assert method.edits[0].shape[1] > 0
    assert float((b_k.T @ method.edits[0]).abs().max()) < 1e-4  # B_e orthogonalised against B_k
    assert _orthonormal_error(method.basis(0)) < 1e-4


def test_model_passages_come_from_the_locate_sampler_cache(tokenizer, cache) -> None:
    model = tiny_model("llama")
    method = build_method("oedit-plus", model, tokenizer, {**FAST, "knowledge_text": "model"})
    method.ensure_knowledge()
    from lemoe.methods.locate.stats import stats_dir

    corpus = list(
        stats_dir(model_fingerprint(model)).glob("corpus-model-6x16-*.json")
    )  # the locate core's own cache file
    assert len(corpus) == 1
    passages = json.loads(corpus[0].read_text())
    assert method.knowledge_info["texts"] == len(passages) == 6


def test_cache_keys_differ_per_text_and_are_reused_for_the_same_text(tokenizer, cache, tmp_path, monkeypatch) -> None:
    texts = ["knowns", "model", _text_file(tmp_path, "a.txt"), _text_file(tmp_path, "b.txt", offset=100)]
    model = tiny_model("llama")
    bases = []
    for text in texts:
        m = build_method("oedit", model, tokenizer, {**FAST, "knowledge_text": text})
        m.ensure_knowledge()
        bases.append(m.knowledge[0])
    files = sorted((cache / "oedit").glob("*.safetensors"))
    assert len(files) == len(texts)  # one entry per text
    assert not torch.allclose(bases[2].abs(), bases[3].abs(), atol=1e-3)  # different texts, different B_k

    calls = []
    real = knowledge.knowledge_covariance
    monkeypatch.setattr(knowledge, "knowledge_covariance", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = build_method("oedit", model, tokenizer, {**FAST, "knowledge_text": texts[3]})
    again.ensure_knowledge()
    assert calls == []  # same text: read from the cache
    assert torch.allclose(again.knowledge[0].abs(), bases[3].abs(), atol=1e-5)

    one, two = PassagesText("x", ("a b c",), 16), PassagesText("x", ("a b d",), 16)
    assert knowledge_cache_path(model_fingerprint(model), 1, "keys", "in", one) != knowledge_cache_path(
        model_fingerprint(model), 1, "keys", "in", two
    )
    longer = PassagesText("x", ("a b c",), 32)  # the token limit changes the statistic too
    assert knowledge_cache_path(model_fingerprint(model), 1, "keys", "in", one) != knowledge_cache_path(
        model_fingerprint(model), 1, "keys", "in", longer
    )


def test_knowns_cache_key_is_unchanged(tokenizer, cache) -> None:
    """The default keeps the key it always had, so existing cached knowns statistics stay valid."""
    model = tiny_model("llama")
    ident = json.dumps(
        {"model": model_fingerprint(model), "knowns": KNOWNS[:200], "source": "keys", "side": "in"}, sort_keys=True
    )
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    path = knowledge_cache_path(model_fingerprint(model), 2, "keys", "in", KnownsText(200))
    assert path.name == f"{digest}-layer2.safetensors"


def test_state_records_the_knowledge_text(tokenizer, cache, tmp_path) -> None:
    text = _text_file(tmp_path)
    method = build_method("oedit-plus", tiny_model("llama"), tokenizer, {**FAST, "knowledge_text": text})
    method.apply(_requests(1))
    method.save_pretrained(tmp_path / "s")
    loaded = load_method(str(tmp_path / "s"), tiny_model("llama"), tokenizer)
    assert loaded.knowledge_info == method.knowledge_info
    assert len(loaded.knowledge_info["texts_sha256"]) == 16
    assert torch.equal(loaded.knowledge[0], method.knowledge[0])


@pytest.mark.parametrize(
    "bad",
    [
        {"knowledge_text": ""},
        {"knowledge_text": "knows"},
        {"knowledge_text": 3},
        {"knowledge_text": "zsre:/no/such/file.json"},
        {"knowledge_text": "nokind:/etc/hostname"},
        {"knowledge_text": "temporal:sample"},
        {"knowledge_text": "EMPTY"},
        {"knowledge_text": "model", "knowledge_samples": 0},
        {"knowledge_samples": 201},
        {"knowledge_text": "model", "knowledge_max_tokens": 1},
    ],
)
def test_bad_knowledge_text_raises_and_changes_nothing(tokenizer, cache, tmp_path, bad) -> None:
    if bad.get("knowledge_text") == "EMPTY":
        (tmp_path / "empty.txt").write_text("\n  \n")
        bad = {"knowledge_text": str(tmp_path / "empty.txt")}
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="knowledge_"):
        build_method("oedit-plus", model, tokenizer, {**FAST, **bad})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not cache.exists()  # nothing sampled, nothing cached


def test_many_passages_are_allowed_beyond_the_knowns(tokenizer, tmp_path) -> None:
    cfg = build_method("oedit", tiny_model("llama"), tokenizer, {"knowledge_text": _text_file(tmp_path)}).config
    assert cfg.knowledge_count == 96  # the locate core's passage count by default
    assert build_method("oedit", tiny_model("llama"), tokenizer).config.knowledge_count == 200
    opts = {"knowledge_text": "model", "knowledge_samples": 500}
    assert build_method("oedit", tiny_model("llama"), tokenizer, opts).config.knowledge_count == 500
