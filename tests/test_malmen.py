"""MALMEN / MEND-sum: the normal-equation gradient, batch-split invariance of the cache, the
meta-gradient, and the train -> save -> load -> edit round trip (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from lemoe import fileio
from lemoe.methods import build_method, load_method
from lemoe.methods.base import StateError
from lemoe.methods.malmen import MALMEN, MALMENConfig, MENDSum
from lemoe.methods.malmen.cache import KeyGradCache
from lemoe.methods.malmen.solve import diff_grads, factorise, shift_backward, solve_shift
from lemoe.methods.malmen.train import meta_step
from lemoe.requests import EditRequest, Probe
from lemoe.testing import tiny_model

FACTS = [
    ("The capital of Norway is", "Bergen", "Norway's capital city is", "The sky is", "blue"),
    ("Danielle Darrieux's mother tongue is", "English", "Darrieux speaks natively", "Water is", "wet"),
    ("The Eiffel Tower is in", "Rome", "Where is the Eiffel Tower? It is in", "Grass is", "green"),
    ("Toko Yasuda plays the", "piano", "Toko Yasuda is great at the", "One plus one is", "two"),
    ("Apple was founded by", "Bill Gates", "The founder of Apple is", "Snow is", "cold"),
]


def requests(n: int = 5) -> list[EditRequest]:
    return [
        EditRequest(prompt=p, target_new=t, paraphrases=(para,), locality=(Probe(lp, la),))
        for p, t, para, lp, la in FACTS[:n]
    ]


def tiny_method(cls: type[MALMEN] = MALMEN, family: str = "llama", tokenizer=None, **options) -> MALMEN:
    options = {"n_layers": 2, "rank": 16, "init_lr": 1e-2, **options}
    return cls(tiny_model(family), tokenizer, MALMENConfig(**options))


def test_normal_equation_gradient_matches_autograd() -> None:
    torch.manual_seed(1)
    keys = torch.randn(9, 5, dtype=torch.float64)
    diffs = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, dtype=torch.float64)
    gram = keys.T @ keys
    shift = torch.linalg.solve(gram + lam * torch.eye(5, dtype=torch.float64), keys.T @ diffs)
    (shift * g).sum().backward()
    factor = factorise(gram, lam.detach())
    assert torch.allclose(solve_shift(factor, keys.T @ diffs.detach()), shift.detach())
    solved, grad_lam = shift_backward(factor, shift.detach(), g)
    assert torch.allclose(diff_grads(keys, solved), diffs.grad, atol=1e-10)
    assert torch.allclose(grad_lam, lam.grad, atol=1e-10)


@pytest.mark.parametrize("cls", [MALMEN, MENDSum])
def test_meta_gradient_matches_autograd_through_the_hypernet(tokenizer, cls: type[MALMEN]) -> None:
    """backward_shifts (closed form + chunked proxy loss) equals autograd through the whole chain."""
    method = tiny_method(cls, tokenizer=tokenizer, net_batch_size=3)
    method.net.requires_grad_(True)
    with torch.no_grad():  # make the zero-initialised B matter so every parameter gets a gradient
        for p in method.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with method.build_cache(requests(4), update_norm=True) as cache:
        shifts = method.predict_shifts(cache)
        g = [torch.randn_like(s) for s in shifts.shifts]
        method.backward_shifts(cache, shifts, g)
        unused = {"log_lambda"} if cls is MENDSum else set()  # summing has no ridge term
        params = {n: p for n, p in method.net.named_parameters() if n.rsplit(".", 1)[-1] not in unused}
        analytic = {n: p.grad.clone() for n, p in params.items()}
        method.net.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for slot in range(len(method.layers)):
            net, m = method._net(slot)
            keys, grads = next(cache.chunks(slot, 10_000))
            if cls is MENDSum:
                s = net.rank_one_sum(keys, grads, m).double()
            else:
                k = keys.double()
                lam = net.log_lambda[m].double().exp()
                s = torch.linalg.solve(
                    k.T @ k + lam * torch.eye(k.shape[1], dtype=torch.float64),
                    k.T @ net.value_diffs(keys, grads, m).double(),
                )
            # float32 sums: relative to the whole shift (an entry near zero can be 1e-3 off relative to itself)
            assert (s.detach() - shifts.shifts[slot]).norm() <= 1e-5 * s.norm()
            total = total + (s * g[slot].double()).sum()
        total.backward()
    for name, p in params.items():
        assert p.grad is not None and analytic[name].abs().sum() > 0, name
        exact = p.grad.to(analytic[name])
        assert (analytic[name] - exact).norm() <= 1e-4 * exact.norm(), name


@pytest.mark.parametrize("cls", [MALMEN, MENDSum])
def test_cache_gives_same_shifts_for_any_batch_split(tokenizer, cls: type[MALMEN], tmp_path) -> None:
    reference = None
    for lm_batch, net_batch, memory_mb in [(5, 1024, 1024.0), (1, 1, 1024.0), (2, 3, 1024.0), (3, 2, 1e-4)]:
        method = tiny_method(
            cls, tokenizer=tokenizer, lm_batch_size=lm_batch, net_batch_size=net_batch, cache_memory_mb=memory_mb
        )
        with method.build_cache(requests()) as cache:
            assert cache.spilled == (memory_mb < 1)
            shifts = method.predict_shifts(cache)
        if reference is None:
            reference = shifts
            assert all(s.abs().sum() > 0 for s in shifts.shifts)
            continue
        assert shifts.n_tokens == reference.n_tokens
        for a, b in zip(shifts.shifts, reference.shifts, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_cache_rechunks_exactly(tmp_path) -> None:
    cache = KeyGradCache(1, memory_mb=5e-5, spill_root=tmp_path)  # 52 bytes: first piece spills, second fits
    cache.add(0, torch.arange(10.0).reshape(5, 2), torch.arange(5.0).reshape(5, 1))
    cache.add(0, torch.arange(10.0, 16.0).reshape(3, 2), torch.arange(5.0, 8.0).reshape(3, 1))
    assert cache.spilled and cache.n_tokens(0) == 8
    sizes = [k.shape[0] for k, _ in cache.chunks(0, 3)]
    assert sizes == [3, 3, 2]
    keys = torch.cat([k for k, _ in cache.chunks(0, 3)])
    assert torch.equal(keys, torch.arange(16.0).reshape(8, 2))
    assert torch.allclose(cache.gram(0), (keys.T @ keys).double())
    cache.close()
    assert list(tmp_path.iterdir()) == []  # the spill folder is removed


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_touches_only_edited_layers_and_reset_restores(tokenizer, family: str) -> None:
    method = tiny_method(family=family, tokenizer=tokenizer)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    edited = {f"{method.access.mlp(layer).out_proj_name}.weight" for layer in method.layers}
    assert method.layers == [2, 3]
    method.apply(requests(3))
    after = method.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) != (k in edited), k
    method.apply(requests(2))  # sequential batches edit on top of each other
    method.reset()
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_save_load_edit_round_trip(tokenizer, tmp_path) -> None:
    method = tiny_method(tokenizer=tokenizer, meta_lr=1e-3)
    method.net.requires_grad_(True)
    opt = torch.optim.Adam(method.net.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        stats = meta_step(method, requests())
        opt.step()
    assert stats["gen_loss"] > 0 and stats["loc_loss"] > -1e-5
    assert int(method.net["128x64"].norm.count) == 2 * 2 * stats["tokens"]  # 2 steps x 2 layers sharing the net
    method.net.requires_grad_(False)
    method.save_pretrained(tmp_path / "editor")

    # a fresh method pointed at the editor gets the same net and makes the same edit
    model2 = tiny_model("llama")
    loaded = build_method("malmen", model2, tokenizer, {"editor": str(tmp_path / "editor"), "n_layers": 3})
    assert loaded.layers == method.layers  # architecture options come from the editor
    for (n, a), b in zip(method.net.state_dict().items(), loaded.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    method.apply(requests(3))
    loaded.apply(requests(3))
    for a, b in zip(method.projections, loaded.projections, strict=True):
        assert torch.allclose(a.weight, b.weight, atol=1e-6)
    assert not torch.equal(method.projections[0].weight, method.originals[0])

    # the edited state round-trips through save_pretrained / load_method onto an unedited model
    method.save_pretrained(tmp_path / "edited")
    model3 = tiny_model("llama")
    restored = load_method(str(tmp_path / "edited"), model3, tokenizer)
    assert isinstance(restored, MALMEN) and restored.batches_applied == 1
    for a, b in zip(method.projections, restored.projections, strict=True):
        assert torch.equal(a.weight, b.weight)


def test_meta_training_reduces_generalisation_loss(tokenizer) -> None:
    method = tiny_method(tokenizer=tokenizer, init_lr=1e-3)
    method.net.requires_grad_(True)
    opt = torch.optim.Adam(method.net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        losses.append(meta_step(method, requests())["gen_loss"])
        opt.step()
    assert losses[-1] < losses[0]


def test_bad_options_and_states_are_rejected(tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="rank"):
        MALMENConfig(rank=0)
    with pytest.raises(ValueError, match="layers"):
        MALMENConfig(layers=[])
    with pytest.raises(ValueError, match="unknown option"):
        build_method("malmen", tiny_model("llama"), tokenizer, {"nope": 1})
    with pytest.raises(ValueError, match="out of range"):
        tiny_method(tokenizer=tokenizer, layers=[7])
    method = tiny_method(tokenizer=tokenizer)
    method.save_pretrained(tmp_path / "e")
    with pytest.raises(StateError, match="another base model"):
        build_method("malmen", tiny_model("llama", seed=1), tokenizer, {"editor": str(tmp_path / "e")})
    with pytest.raises(StateError):
        method.load_state_dict({"net.bogus": torch.zeros(1)}, {})
    weights = [p.weight.clone() for p in method.projections]
    with pytest.raises(ValueError):
        method.apply([EditRequest(prompt="ok", target_new="x"), EditRequest(prompt="", target_new="y")])
    assert all(torch.equal(a, p.weight) for a, p in zip(weights, method.projections, strict=True))


def _trainer_args(tokenizer, tmp_path) -> list[str]:
    """Trainer options for a tiny model saved to a folder and ten CounterFact-format records."""
    import json

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    records = [
        {
            "case_id": i,
            "prompt": p,
            "target_new": t,
            "subject": p.split()[0],
            "ground_truth": "x",
            "rephrase_prompt": para,
            "locality_prompt": lp,
            "locality_ground_truth": la,
        }
        for i, (p, t, para, lp, la) in enumerate(FACTS * 2)
    ]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    return [
        "--out",
        str(tmp_path / "run"),
        "--model",
        str(model_dir),
        "--counterfact",
        str(data),
        "--val-size",
        "3",
        "--edits-per-step",
        "3",
        "--val-every",
        "2",
        "--save-every",
        "1",
        "--opt",
        "n_layers=2",
        "--opt",
        "rank=8",
    ]


def test_trainer_cli_checkpoints_and_resumes(tokenizer, tmp_path) -> None:
    """The trainer entry point on a tiny model saved to a folder: run, refuse to overwrite, resume."""
    import json

    from lemoe.cli.train_editor import main

    common = _trainer_args(tokenizer, tmp_path)
    out = tmp_path / "run"
    assert main([*common, "--steps", "2"]) == 0
    assert {"editor", "best", "trainer.json", "trainer.json.tensors", "log.jsonl"} <= {p.name for p in out.iterdir()}
    with pytest.raises(SystemExit, match="--resume"):
        main([*common, "--steps", "3"])
    assert main([*common, "--steps", "3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "val" in json.loads((out / "log.jsonl").read_text().splitlines()[1])
    editor = load_method(str(out / "editor"), tiny_model("llama"), tokenizer)
    assert isinstance(editor, MALMEN) and editor.layers == [2, 3]


@pytest.mark.parametrize(("name", "cls"), [("malmen", MALMEN), ("mend-sum", MENDSum)])
def test_lemoe_train_editor_subcommand(tokenizer, tmp_path, name: str, cls: type[MALMEN]) -> None:
    """`lemoe train-editor` runs the trainer: checkpoint, resume from it, and the editor loads and edits."""
    from lemoe.cli import main

    common = [*_trainer_args(tokenizer, tmp_path), "--method", name]
    out = tmp_path / "run"
    assert main(["train-editor", *common, "--steps", "2"]) == 0
    assert {"editor", "best", "trainer.json", "trainer.json.tensors", "log.jsonl"} <= {p.name for p in out.iterdir()}
    saved = fileio.load_tree(out / "trainer.json")
    assert saved["step"] == 2 and saved["args"]["method"] == name
    assert "func" not in saved["args"]  # the CLI's dispatch is not stored in the checkpoint
    assert main(["train-editor", *common, "--steps", "3", "--resume"]) == 0
    assert fileio.load_tree(out / "trainer.json")["step"] == 3

    editor = load_method(str(out / "editor"), tiny_model("llama"), tokenizer)
    assert type(editor) is cls and editor.layers == [2, 3]
    direct = cls.from_pretrained(out / "editor", tiny_model("llama"), tokenizer)
    for a, b in zip(editor.net.state_dict().values(), direct.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    before = [p.weight.clone() for p in editor.projections]
    editor.apply(requests(2))
    assert editor.batches_applied == 1
    assert any(not torch.equal(a, p.weight) for a, p in zip(before, editor.projections, strict=True))
