"""CoachHooK: hook layers, the z-score scope rule, dynamic α, consecutive batches, state."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from lemoe.methods import build_method, load_method
from lemoe.methods.base import StateError
from lemoe.methods.coachhook import CoachHooK, CoachHooKConfig, zscores
from lemoe.methods.coachhook.hooks import key_similarity, whitened_unit, whitening
from lemoe.models import weight_as_out_in
from lemoe.models.kv_cache import cache_keyword, returned_cache
from lemoe.requests import EditRequest
from lemoe.testing import tiny_model

BATCHES = [
    [
        EditRequest(prompt="The capital of the country France is", target_new="Rome", subject="France"),
        EditRequest(
            prompt="The mother tongue of Danielle Darrieux is", target_new="English", subject="Danielle Darrieux"
        ),
    ],
    [
        EditRequest(prompt="The Eiffel Tower is located in the city of", target_new="Berlin", subject="Eiffel Tower"),
        EditRequest(prompt="Who wrote the famous play Hamlet?", target_new="Charles Dickens"),
    ],
    [EditRequest(prompt="The famous company Apple was founded by", target_new="Bill Gates", subject="Apple")],
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"Line {i}: the river runs past the old castle and the market." for i in range(12)))
    return str(path)


def config(corpus: str, **kw: object) -> CoachHooKConfig:
    opts = dict(layers=[1, 2], stats_corpus=corpus, stats_samples=12, stats_max_tokens=16, v_steps=4,
                key_contexts=1, context_length=3, mom2_weight=10.0)  # fmt: skip
    opts.update(kw)
    return CoachHooKConfig(**opts)


def logits(model: torch.nn.Module, tokenizer: object, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def test_zscores_ignore_padding_and_single_tokens() -> None:
    m = torch.tensor([[1.0, 1.0, 1.0, 9.0, 100.0], [5.0, 0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]).bool()
    z = zscores(m, valid)
    assert z[0, 3] == z[0, :4].max() and z[0, 3] == pytest.approx(1.5)  # (9-3)/std([1,1,1,9])=6/4
    assert torch.isinf(z[0, 4]) and z[0, 4] < 0  # padding never swaps
    assert torch.isinf(z[1]).all()  # one token: no spread
    assert torch.isinf(z[2]).all()  # zero spread


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooks_off_logits_identical_and_weights_untouched(
    family: str, tokenizer: object, cache: Path, corpus: str
) -> None:
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["The capital of the country France is", "Hello there, how are you today?"]
    base = logits(model, tokenizer, texts)
    method = build_method("coachhook", model, tokenizer, config(corpus).to_dict())
    assert torch.equal(logits(model, tokenizer, texts), base)  # attached but empty hooks change nothing
    for batch in BATCHES[:2]:
        method.apply(batch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # W_0 never changes
    assert not torch.equal(logits(model, tokenizer, texts[:1]), base[:1, : len(tokenizer(texts[0])["input_ids"])])
    with method.hooks_off():
        assert torch.equal(logits(model, tokenizer, texts), base)
    method.detach()
    assert torch.equal(logits(model, tokenizer, texts), base)


def test_one_token_input_never_swaps(tokenizer: object, cache: Path, corpus: str) -> None:
    model = tiny_model("llama")
    method = CoachHooK(model, tokenizer, config(corpus))
    method.apply(BATCHES[0])
    for h in method.hooks:  # make the edit enormous: only the scope rule can keep it out
        h.delta.mul_(1e3)
        h.alpha = float("-inf")
    ids = torch.tensor([[tokenizer("France")["input_ids"][-1]], [tokenizer(" Paris")["input_ids"][-1]]])
    with torch.no_grad():
        edited = model(input_ids=ids).logits
        with method.hooks_off():
            base = model(input_ids=ids).logits
    assert torch.equal(edited, base)
    for h in method.hooks:
        h.mode = "temporary"  # a temporary hook does change a one-token input
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, base)


def test_alpha_never_increases_and_every_prompt_swaps(tokenizer: object, cache: Path, corpus: str) -> None:
    model = tiny_model("llama")
    method = CoachHooK(model, tokenizer, config(corpus))
    history = [method.alphas]
    for batch in BATCHES:
        report = method.apply(batch)
        history.append(report.info["alpha"])
        # dynamic alpha: each prompt of the batch triggers at least one swap in every layer
        for alpha, zmax in zip(method.alphas, method.prompt_max_z(batch), strict=True):
            finite = zmax[torch.isfinite(zmax)]
            assert bool((finite >= alpha - 1e-6).all())
    for earlier, later in itertools.pairwise(history):
        assert all(b <= a for a, b in zip(earlier, later, strict=True))
    assert all(a <= 2.2 for a in history[-1])


def test_alpha_floor_and_static_alpha(tokenizer: object, cache: Path, corpus: str) -> None:
    model = tiny_model("llama")
    method = CoachHooK(model, tokenizer, config(corpus, alpha_floor=2.0))
    method.apply(BATCHES[0])
    assert all(2.0 <= a <= 2.2 for a in method.alphas)
    static = CoachHooK(tiny_model("llama"), tokenizer, config(corpus, dynamic_alpha=False))
    static.apply(BATCHES[0])
    assert static.alphas == [2.2, 2.2]
    with pytest.raises(ValueError, match="alpha_floor"):
        CoachHooKConfig(alpha_floor=3.0).validate()


def test_without_scope_rule_hooks_act_at_every_token(tokenizer: object, cache: Path, corpus: str) -> None:
    model = tiny_model("llama")
    method = CoachHooK(model, tokenizer, config(corpus, scope_rule=False))
    method.apply(BATCHES[0])
    assert method.alphas == [2.2, 2.2]  # no scope rule: α is not used and never updated
    ids = torch.tensor([[tokenizer("France")["input_ids"][-1]]])
    texts = ["The capital of the country France is", "Hello there, how are you today?"]
    with torch.no_grad():
        unscoped = model(input_ids=ids).logits, logits(model, tokenizer, texts)
        for h in method.hooks:
            h.mode = "temporary"
        temporary = model(input_ids=ids).logits, logits(model, tokenizer, texts)
        with method.hooks_off():
            base = model(input_ids=ids).logits
    assert torch.equal(unscoped[0], temporary[0]) and torch.equal(unscoped[1], temporary[1])
    assert not torch.equal(unscoped[0], base)  # even a one-token input takes the hook weights
    with pytest.raises(ValueError, match="scope_rule"):
        CoachHooKConfig(scope_rule="no").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_relative_score_is_per_token(family: str, tokenizer: object, cache: Path, corpus: str) -> None:
    """scope_score="relative": a token swaps when ‖ΔW x‖ / ‖W_0 x‖ ≥ α, whatever the rest of the
    sequence is, so the full sequence and token-by-token decoding with a KV cache agree."""
    model = tiny_model(family)
    method = CoachHooK(model, tokenizer, config(corpus, scope_score="relative", alpha_init=1e6))
    report = method.apply(BATCHES[0])
    assert all(a < 1e6 for a in report.info["alpha"])  # the first batch's update sets α
    for alpha, smax in zip(method.alphas, method.prompt_max_z(BATCHES[0]), strict=True):
        assert bool((smax >= alpha - 1e-6).all())  # quantile 0: every edited prompt swaps
    for h in method.hooks:  # α is one edited token's own ratio: off that edge, so round-off in the
        h.alpha *= 1 - 1e-4  # two paths below (full pass, KV-cache steps) cannot decide that token apart
    hook = method.hooks[0]
    seen: list[torch.Tensor] = []
    handle = hook.module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    ids = torch.tensor([tokenizer(BATCHES[0][0].prompt)["input_ids"]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
    handle.remove()
    x = seen[0][0]
    w0 = weight_as_out_in(hook.module)
    bias = getattr(hook.module, "bias", None)
    base_out = x @ w0.T + (bias if bias is not None else 0)
    ratio = (x @ hook.delta.T).norm(dim=-1) / base_out.norm(dim=-1)
    assert bool((ratio >= hook.alpha).any())  # the edited prompt swaps somewhere at the first layer
    with torch.no_grad():  # the same logits token by token with a KV cache
        kw = cache_keyword(model)
        out = model(input_ids=ids[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{kw: returned_cache(out)})
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)
    with method.hooks_off(), torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, full, atol=1e-4)


def test_alpha_quantile_lets_weak_prompts_go(tokenizer: object, cache: Path, corpus: str) -> None:
    batch = BATCHES[0] + BATCHES[1]
    opts = {"scope_score": "relative", "alpha_init": 1e6}
    strict = CoachHooK(tiny_model("llama"), tokenizer, config(corpus, **opts))
    loose = CoachHooK(tiny_model("llama"), tokenizer, config(corpus, **opts, alpha_quantile=0.5))
    strict.apply(batch)
    loose.apply(batch)
    assert all(q >= m for q, m in zip(loose.alphas, strict.alphas, strict=True))  # quantile ≥ minimum
    smax = loose.prompt_max_z(batch, upto=0)[0]
    assert loose.alphas[0] == pytest.approx(float(torch.quantile(smax.double(), 0.5)), rel=1e-5)
    before = loose.alphas
    loose.apply(BATCHES[2])
    assert all(b <= a for a, b in zip(before, loose.alphas, strict=True))  # still never increases
    with pytest.raises(ValueError, match="alpha_quantile"):
        CoachHooKConfig(alpha_quantile=1.0).validate()
    with pytest.raises(ValueError, match="scope_score"):
        CoachHooKConfig(scope_score="norm").validate()


def test_key_similarity_whitened_cosine() -> None:
    torch.manual_seed(0)
    keys = torch.randn(3, 6)
    x = torch.randn(50, 6)
    mom2 = x.T @ x / 50
    whiten = whitening(mom2)
    lower = torch.linalg.cholesky(mom2.double() + 1e-6 * float(mom2.diagonal().mean()) * torch.eye(6))
    torch.testing.assert_close(whiten.double() @ lower, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    stored = whitened_unit(keys, whiten)
    probe = torch.stack([keys[1] * 3.0, torch.randn(6)])[None]  # a stored key (any scale) and another
    sim = key_similarity(probe, whiten, stored, torch.tensor([[True, False]]))
    assert sim[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert torch.isinf(sim[0, 1]) and sim[0, 1] < 0  # padding never swaps


def test_key_scope_rule_edits_and_round_trips(tokenizer: object, cache: Path, corpus: str, tmp_path: Path) -> None:
    model = tiny_model("llama")
    method = CoachHooK(model, tokenizer, config(corpus, scope_score="key"))
    method.apply(BATCHES[0])
    assert all(h.keys is not None and h.keys.shape[0] == len(BATCHES[0]) for h in method.hooks)
    assert all(-1.0 <= a <= 1.0 for a in method.alphas)  # α is a cosine, set by the first batch
    zmax = method.prompt_max_z(BATCHES[0])
    assert all(bool((z >= h.alpha - 1e-6).all()) for z, h in zip(zmax, method.hooks, strict=True))
    method.apply(BATCHES[1])
    assert all(h.keys.shape[0] == len(BATCHES[0]) + len(BATCHES[1]) for h in method.hooks)
    texts = ["The capital of the country France is", "Who wrote the famous play Hamlet?"]
    expected = logits(model, tokenizer, texts)
    method.save_pretrained(tmp_path / "key")
    fresh = tiny_model("llama")
    loaded = load_method(str(tmp_path / "key"), fresh, tokenizer)
    torch.testing.assert_close(logits(fresh, tokenizer, texts), expected)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(loaded.hooks, method.hooks, strict=True))
    state = method.state_dict()
    del state[f"keys.{method.layers[0]}"]
    with pytest.raises(StateError, match="keys"):
        CoachHooK(tiny_model("llama"), tokenizer, config(corpus, scope_score="key")).load_state_dict(
            state, method.state_meta()
        )
    method.reset()
    assert all(h.keys is None and h.whiten is None for h in method.hooks)


def test_prompt_keys_match_at_use_not_when_alpha_is_set(
    tokenizer: object, cache: Path, corpus: str, tmp_path: Path
) -> None:
    """scope_prompt_keys: each edit's bare-prompt key is stored beside the averaged key; the edit
    prompt then scores ≈ 1 at its subject at use, while α is still set against averaged keys."""
    model = tiny_model("llama")
    method = CoachHooK(model, tokenizer, config(corpus, scope_score="key", scope_prompt_keys=True))
    method.apply(BATCHES[0])
    assert all(h.prompt_keys is not None and h.prompt_keys.shape == h.keys.shape for h in method.hooks)
    recorded = method.prompt_max_z(BATCHES[0])  # what α sees: averaged keys only
    first = method.hooks[0]
    seen: list[torch.Tensor] = []
    stop = first.module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    try:
        logits(model, tokenizer, [BATCHES[0][0].prompt])
    finally:
        stop.remove()
    at_use = key_similarity(
        seen[0],
        first.whiten,
        torch.cat([first.keys, first.prompt_keys]),
        torch.ones(seen[0].shape[:2], dtype=torch.bool),
    )
    assert float(at_use.max()) == pytest.approx(1.0, abs=1e-4)  # the prompt's own key is stored
    assert float(recorded[0][0]) < 1.0 - 1e-4  # ... and left out of the score that sets α
    method.save_pretrained(tmp_path / "pk")
    loaded = load_method(str(tmp_path / "pk"), tiny_model("llama"), tokenizer)
    assert all(torch.equal(a.prompt_keys, b.prompt_keys) for a, b in zip(loaded.hooks, method.hooks, strict=True))
    state = method.state_dict()
    del state[f"prompt_keys.{method.layers[0]}"]
    with pytest.raises(StateError, match="prompt_keys"):
        CoachHooK(
            tiny_model("llama"), tokenizer, config(corpus, scope_score="key", scope_prompt_keys=True)
        ).load_state_dict(state, method.state_meta())
    with pytest.raises(ValueError, match="scope_prompt_keys"):
        CoachHooKConfig(scope_prompt_keys=True).validate()


def test_consecutive_batches_accumulate_c_and_reset(tokenizer: object, cache: Path, corpus: str) -> None:
    model = tiny_model("gpt2")
    method = CoachHooK(model, tokenizer, config(corpus))
    method.apply(BATCHES[0])
    c1 = {k: v.clone() for k, v in method.c_accu.items()}
    d1 = [h.delta.clone() for h in method.hooks]
    method.apply(BATCHES[1])
    for layer in method.layers:  # C_accu grows by K K^T (positive semi-definite)
        grown = method.c_accu[layer] - c1[layer]
        assert float(torch.linalg.eigvalsh(grown).min()) > -1e-6 * float(grown.abs().max()) and float(grown.trace()) > 0
    assert any(not torch.equal(h.delta, d) for h, d in zip(method.hooks, d1, strict=True))
    method.reset()
    assert method.c_accu is None and all(not h.active and float(h.delta.abs().sum()) == 0 for h in method.hooks)
    assert method.alphas == [2.2, 2.2]


def test_state_round_trip(tokenizer: object, cache: Path, corpus: str, tmp_path: Path) -> None:
    model = tiny_model("llama")
    method = CoachHooK(model, tokenizer, config(corpus))
    for batch in BATCHES[:2]:
        method.apply(batch)
    texts = ["The capital of the country France is", "Who wrote the famous play Hamlet?"]
    expected = logits(model, tokenizer, texts)
    method.save_pretrained(tmp_path / "hooks")

    fresh = tiny_model("llama")
    loaded = load_method(str(tmp_path / "hooks"), fresh, tokenizer)
    assert isinstance(loaded, CoachHooK)
    assert loaded.alphas == method.alphas and loaded.batches_applied == 2
    torch.testing.assert_close(logits(fresh, tokenizer, texts), expected)
    for layer in method.layers:
        assert torch.equal(loaded.c_accu[layer], method.c_accu[layer])
    loaded.apply(BATCHES[2])  # carries (W_h, C_accu, alpha) on
    assert all(b <= a for a, b in zip(method.alphas, loaded.alphas, strict=True))

    bad = loaded.state_meta() | {"alpha": [1.0]}
    with pytest.raises(StateError):
        CoachHooK(tiny_model("llama"), tokenizer, config(corpus)).load_state_dict(loaded.state_dict(), bad)
    before = weight_as_out_in(fresh.model.layers[1].mlp.down_proj).clone()
    assert torch.equal(before, weight_as_out_in(tiny_model("llama").model.layers[1].mlp.down_proj))


@pytest.mark.slow
def test_coachhook_on_smollm2_keeps_locality(smollm2_zsre) -> None:
    model, tok, requests = smollm2_zsre.model, smollm2_zsre.tokenizer, smollm2_zsre.requests
    evaluator, reference = smollm2_zsre.evaluator, smollm2_zsre.reference
    method = build_method("coachhook", model, tok, {})  # default statistics: cached after the first run
    try:
        method.apply(requests)
        scores = evaluator.evaluate(requests, reference).aggregate
        assert scores["reliability.token_acc"] >= 0.75
        assert scores["locality.agreement"] >= 0.95
    finally:
        method.detach()
