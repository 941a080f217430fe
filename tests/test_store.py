"""The edit store on tiny models: journal, identity checks, recovery, rollback, verify, export, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lemoe.methods import METHODS, get_method, load_method
from lemoe.methods.base import EditMethod, MethodConfig, RollbackNotSupported
from lemoe.requests import EditRequest, InvalidRequestError
from lemoe.store import (
    DuplicateEditError,
    EditStore,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    verify_store,
)
from lemoe.testing import tiny_model

FT_OPTIONS = {"steps": 2, "lr": 1e-2}


@dataclass
class CountingConfig(MethodConfig):
    pass


class CountingMethod(EditMethod):
    """A deterministic test method that counts how often each request was applied (and can roll back).

    It leaves the model alone; its whole state is the per-request counts, so "applied exactly once"
    is directly observable.
    """

    name = "counting"
    config_class = CountingConfig
    supports_rollback = True

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: CountingConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        self.counts: dict[str, int] = {}
        self.batches: dict[int, list[str]] = {}

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        ids = [r.request_id for r in requests]
        for rid in ids:
            self.counts[rid] = self.counts.get(rid, 0) + 1
        self.batches[self.batches_applied] = ids
        return {}

    def reset(self) -> None:
        self.counts, self.batches, self.batches_applied = {}, {}, 0

    def rollback(self, batch_index: int) -> None:
        for rid in self.batches.pop(batch_index):
            self.counts[rid] -= 1
            if not self.counts[rid]:
                del self.counts[rid]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": torch.tensor([sum(self.counts.values())])}

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "counts": self.counts, "batches": {str(k): v for k, v in self.batches.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.counts = dict(meta["counts"])
        self.batches = {int(k): list(v) for k, v in meta["batches"].items()}
        self.batches_applied = int(meta["batches_applied"])


@pytest.fixture
def counting_registered(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(METHODS, "counting", f"{__name__}:CountingMethod")
    return "counting"


def make_requests(n: int, prefix: str = "") -> list[EditRequest]:
    names = [
        "Alice Martin",
        "Bruno Costa",
        "Chen Wei",
        "Dara Okafor",
        "Elif Yilmaz",
        "Farid Haddad",
        "Greta Lind",
        "Hiro Tanaka",
        "Ines Duarte",
        "Jonas Berg",
        "Kofi Mensah",
        "Lena Novak",
    ]
    cities = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Perth", "Accra", "Lyon", "Porto"]
    return [
        EditRequest(
            prompt=f"{prefix}{names[i % len(names)]} {i} was born in the city of",
            target_new=cities[i % len(cities)],
            subject=f"{names[i % len(names)]} {i}",
            paraphrases=(f"The birthplace of {prefix}{names[i % len(names)]} {i} is",),
            locality=({"prompt": "The capital of France is", "answer": "Paris"},),
        )
        for i in range(n)
    ]


def tiny_loaded(tokenizer: object, seed: int = 0) -> tuple[torch.nn.Module, object]:
    return tiny_model("llama", seed=seed), tokenizer


def ft_delta(store: EditStore) -> torch.Tensor:
    return store.method.state_dict()["delta"].clone()


def journal_rows(root: Path) -> list[tuple]:
    conn = sqlite3.connect(root / "journal.sqlite")
    try:
        return [tuple(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in ("edits", "batches", "checkpoints")]
    finally:
        conn.close()


@pytest.fixture
def ft_store(tmp_path: Path, tokenizer: object) -> Path:
    root = tmp_path / "store"
    with EditStore.init(
        root, model="tiny-llama", method="ft-m", options=FT_OPTIONS, edits_per_step=2, loaded=tiny_loaded(tokenizer)
    ) as store:
        store.submit(make_requests(6))
        store.apply_pending()
    return root


def test_journal_records_batches_and_reopen_restores_the_state(tmp_path: Path, tokenizer: object) -> None:
    root = tmp_path / "store"
    with EditStore.init(
        root, model="tiny-llama", method="ft-m", options=FT_OPTIONS, edits_per_step=2, loaded=tiny_loaded(tokenizer)
    ) as store:
        done = store.submit(make_requests(5))
        assert [d.seq for d in done] == [1, 2, 3, 4, 5] and not any(d.duplicate for d in done)
        batches = store.apply_pending()
        assert [b.seqs for b in batches] == [[1, 2], [3, 4], [5]]
        delta = ft_delta(store)
        assert delta.abs().sum() > 0
        assert store.counts()["applied"] == 5
        assert store.method.batches_applied == 3
    with EditStore.open(root, loaded=tiny_loaded(tokenizer)) as store:
        assert torch.equal(ft_delta(store), delta)
        assert store.method.batches_applied == 3
        assert [e.batch_id for e in store.edits()] == [1, 1, 2, 2, 3]
        assert all(e.applied_at is not None for e in store.edits())
    assert verify_store(root).ok


def test_submit_is_validated_idempotent_and_all_or_nothing(ft_store: Path, tokenizer: object) -> None:
    with EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)) as store:
        before = journal_rows(ft_store)
        again = store.submit(make_requests(2))  # the same requests: acknowledged, not added
        assert [d.seq for d in again] == [1, 2] and all(d.duplicate for d in again)
        bad = EditRequest(prompt="Who is it?", target_new="x", subject="Nobody")  # subject not in prompt
        with pytest.raises(InvalidRequestError, match="subject"):
            store.submit([*make_requests(2, prefix="New "), bad])
        clash = EditRequest(prompt="Something else", target_new="y", request_id=make_requests(1)[0].request_id)
        with pytest.raises(DuplicateEditError):
            store.submit([clash])
        assert journal_rows(ft_store) == before


def test_open_refuses_another_model_method_or_format(ft_store: Path, tokenizer: object) -> None:
    with pytest.raises(StoreMismatchError, match="another base model"):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer, seed=1))
    with pytest.raises(StoreMismatchError, match="method"):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer), expect_method="lemoe")
    spec_path = ft_store / "store.json"
    original = spec_path.read_text()
    assert '"format_version": 2' in original
    spec_path.write_text(original.replace('"format_version": 2', '"format_version": 99'))
    with pytest.raises(StoreMismatchError, match="format version 99"):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer))
    spec_path.write_text(original.replace('"edits_per_step": 2', '"edits_per_step": 3'))
    with pytest.raises(StoreCorruptError, match="does not match the journal"):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer))
    spec_path.write_text(original)
    with pytest.raises(StoreError, match="not an edit store"):
        EditStore.open(ft_store / "checkpoints", loaded=tiny_loaded(tokenizer))


def test_one_writer_at_a_time(ft_store: Path, tokenizer: object) -> None:
    with EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)), pytest.raises(StoreBusyError):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer))
    EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)).close()  # released on close


def test_rollback_without_native_support_needs_replay(ft_store: Path, tokenizer: object, tmp_path: Path) -> None:
    with EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)) as store:
        before = journal_rows(ft_store)
        with_2 = ft_delta(store)
        with pytest.raises(RollbackNotSupported, match="replay"):
            store.rollback([2])
        assert journal_rows(ft_store) == before
        assert store.rollback([2], replay=True) == [2]
        without_2 = ft_delta(store)
        assert [e.status for e in store.edits()] == ["applied"] * 2 + ["rolled_back"] * 2 + ["applied"] * 2
        with pytest.raises(StoreError, match="rolled_back"):
            store.rollback([2], replay=True)
    # Replay is exact for a deterministic method: the same as never having applied batch 2 (up to
    # float summation order, far below what batch 2 itself changed).
    assert (with_2 - without_2).abs().max() > 1e-3
    reqs = make_requests(6)
    with EditStore.init(
        tmp_path / "ref",
        model="tiny-llama",
        method="ft-m",
        options=FT_OPTIONS,
        edits_per_step=2,
        loaded=tiny_loaded(tokenizer),
    ) as ref:
        ref.submit(reqs[:2] + reqs[4:])
        ref.apply_pending()
        torch.testing.assert_close(ft_delta(ref), without_2, rtol=0, atol=1e-5)
    with EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)) as store:
        torch.testing.assert_close(ft_delta(store), without_2, rtol=0, atol=0)
        store.rollback_after(0, replay=True)
        assert ft_delta(store).abs().max() == 0
        assert store.counts()["rolled_back"] == 6
    assert verify_store(ft_store).ok


def test_native_rollback_one_batch_and_everything_after(
    tmp_path: Path, tokenizer: object, counting_registered: str
) -> None:
    root = tmp_path / "store"
    reqs = make_requests(8)
    with EditStore.init(
        root, model="tiny-llama", method="counting", edits_per_step=2, loaded=tiny_loaded(tokenizer)
    ) as store:
        store.submit(reqs)
        store.apply_pending()
        store.rollback([2])
        assert set(store.method.counts) == {r.request_id for r in reqs[:2] + reqs[4:]}
        store.rollback_after(3)
        assert set(store.method.counts) == {r.request_id for r in reqs[:2] + reqs[4:6]}
        store.submit(make_requests(2, prefix="Later "))
        store.apply_pending()
    with EditStore.open(root, loaded=tiny_loaded(tokenizer)) as store:
        live = {e.request_id for e in store.edits(status="applied")}
        assert store.method.counts == dict.fromkeys(live, 1)
        assert len(live) == 6
    assert verify_store(root).ok


def test_lemoe_store_native_rollback_survives_reopen(tmp_path: Path, tokenizer: object) -> None:
    """The default method: rolling back a batch removes its expert; a reopened store holds the same state
    and the edits still applied generate exactly as before."""
    from lemoe.evaluation import Evaluator

    if "lemoe" not in METHODS:
        pytest.skip("LEMoE is not registered")
    root, reqs = tmp_path / "store", make_requests(6)
    with EditStore.init(
        root, method="lemoe", options={"steps": 5}, edits_per_step=2, loaded=tiny_loaded(tokenizer)
    ) as store:
        store.submit(reqs)
        store.apply_pending()
        store.rollback([2])
        assert store.method.state_meta()["n_experts"] == 2
        state = {k: v.clone() for k, v in store.method.state_dict().items()}
        kept = reqs[:2] + reqs[4:]
        scores = Evaluator(store.method.model, tokenizer).evaluate(kept, None, store.method.forward_context).aggregate
    with EditStore.open(root, loaded=tiny_loaded(tokenizer)) as store:
        again = store.method.state_dict()
        assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
        ev = Evaluator(store.method.model, tokenizer)
        assert ev.evaluate(kept, None, store.method.forward_context).aggregate == scores
        store.submit(make_requests(2, prefix="After "))
        assert [b.batch_id for b in store.apply_pending()] == [4]
        store.rollback_after(0)
        assert store.method.state_meta()["n_experts"] == 0
    assert verify_store(root).ok


def test_verify_detects_truncated_checkpoint_and_edited_journal(ft_store: Path, tokenizer: object) -> None:
    assert verify_store(ft_store).ok
    journal = ft_store / "journal.sqlite"
    saved = journal.read_bytes()
    conn = sqlite3.connect(journal)
    row = conn.execute("SELECT request FROM edits WHERE seq = 3").fetchone()[0]
    forged = row.replace("Lisbon", "Lima").replace("Nairobi", "Rome")
    conn.execute("UPDATE edits SET request = ? WHERE seq = 3", (forged,))
    conn.commit()
    report = verify_store(ft_store)
    assert not report.ok and any("edit 3: content hash mismatch" in p for p in report.problems)
    with pytest.raises(StoreCorruptError, match="edit 3: content hash mismatch"):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer))  # opening verifies the journal too
    # Forging the content hash too breaks the hash chain and the newest checkpoint's edit digest.
    new = conn.execute("SELECT request FROM edits WHERE seq = 3").fetchone()[0]
    conn.execute("UPDATE edits SET content_hash = ? WHERE seq = 3", (hashlib.sha256(new.encode()).hexdigest(),))
    conn.execute("UPDATE edits SET status = 'accepted' WHERE seq = 6")
    conn.commit()
    conn.close()
    problems = verify_store(ft_store).problems
    assert any("hash chain" in p for p in problems)
    assert any("edits of its batches changed" in p for p in problems)
    assert any("edit 6: accepted but assigned" in p for p in problems)
    journal.write_bytes(saved)
    for suffix in ("-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)
    assert verify_store(ft_store).ok

    newest = sorted((ft_store / "checkpoints").iterdir())[-1] / "state.json"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    report = verify_store(ft_store)
    assert not report.ok and any("checksum differs" in p for p in report.problems)
    with pytest.raises(StoreCorruptError, match="checksum"):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer))


@pytest.mark.parametrize("name", ["../../victim", "/tmp/victim-abs", "ckpt-00000001/../../../victim", "ckpt-00000099"])
def test_journal_paths_that_leave_the_store_are_refused(
    ft_store: Path, tokenizer: object, tmp_path: Path, name: str
) -> None:
    """A checkpoint row naming any folder but its own (absolute, ``..``, another id) is refused by open
    and verify; the folder it names is neither read nor removed, and the store is left as it was."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("user data")
    target = name.replace("/tmp/victim-abs", str(victim))
    conn = sqlite3.connect(ft_store / "journal.sqlite")
    oldest = conn.execute("SELECT MIN(ckpt_id) FROM checkpoints").fetchone()[0]
    conn.execute("UPDATE checkpoints SET dirname = ? WHERE ckpt_id = ?", (target, oldest))
    conn.commit()
    conn.close()
    before = journal_rows(ft_store)
    report = verify_store(ft_store)
    assert not report.ok and any("names folder" in p and "not 'ckpt-" in p for p in report.problems)
    with pytest.raises(StoreCorruptError, match="names folder"):
        EditStore.open(ft_store, loaded=tiny_loaded(tokenizer))
    assert (victim / "keep.txt").read_text() == "user data"
    assert journal_rows(ft_store) == before


def test_store_leaves_foreign_entries_in_its_checkpoint_folder(ft_store: Path, tokenizer: object) -> None:
    mine = ft_store / "checkpoints" / "my-notes"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    report = verify_store(ft_store)
    assert report.ok and any("not written by the store" in w for w in report.warnings)
    with EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)) as store:
        store.submit(make_requests(8)[6:])
        store.apply_pending()  # writes a checkpoint and prunes old ones
    assert (mine / "a.txt").read_text() == "x"


def test_export_loads_on_a_fresh_model(ft_store: Path, tokenizer: object, tmp_path: Path) -> None:
    with EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)) as store:
        delta = ft_delta(store)
        out = store.export(tmp_path / "export")
    method = load_method(str(out), *tiny_loaded(tokenizer))
    assert torch.equal(method.state_dict()["delta"], delta)
    lines = (out / "edits.jsonl").read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_stray_checkpoint_folders_are_reported_then_cleaned(ft_store: Path, tokenizer: object) -> None:
    stray = ft_store / "checkpoints" / ".tmp-ckpt-00000099-1"
    shutil.copytree(sorted((ft_store / "checkpoints").iterdir())[-1], stray)
    report = verify_store(ft_store)
    assert report.ok and any("not named by the journal" in w for w in report.warnings)
    EditStore.open(ft_store, loaded=tiny_loaded(tokenizer)).close()
    assert not stray.exists()


def test_cli_init_edit_log_rollback_verify_export(tmp_path: Path, tokenizer: object, capsys) -> None:
    from lemoe.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in make_requests(3)))
    store = str(tmp_path / "store")
    assert main(["store", "init", store, "--model", str(model_dir), "--method", "ft-m", "--opt", "steps=1"]) == 0
    assert main(["store", "edit", store, "--json", str(edits)]) == 0
    assert main(["store", "log", store, "--json"]) == 0
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(e["seq"], e["status"], e["batch"]) for e in logged] == [(i, "applied", i) for i in (1, 2, 3)]
    assert main(["store", "rollback", store, "--batch", "2"]) == 2  # ft-m: needs --replay
    assert "replay" in capsys.readouterr().err
    assert main(["store", "rollback", store, "--batch", "2", "--replay"]) == 0
    assert main(["store", "verify", store]) == 0
    assert "store OK" in capsys.readouterr().out
    assert main(["store", "export", store, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "state.safetensors").is_file()
    assert main(["store", "init", store, "--model", str(model_dir)]) == 2  # not empty: clear error
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_store_with_the_default_method(smollm2, tmp_path: Path) -> None:
    """SmolLM2 + the default method (LEMoE once registered, else FT-M): edit, reopen, roll back."""
    import copy

    from lemoe.evaluation.scorers import greedy_generate
    from lemoe.store import default_method

    base, tok = smollm2

    def generate(method: EditMethod, prompt: str) -> str:
        ids = tok(prompt)["input_ids"]
        out = greedy_generate(method.model, tok, [ids], [6], context=method.forward_context)
        return tok.decode(out[0], skip_special_tokens=True)

    reqs = [
        EditRequest(prompt="Danielle Darrieux's mother tongue is", target_new="Dutch", subject="Danielle Darrieux"),
        EditRequest(prompt="The capital city of Norway is", target_new="Bergen", subject="Norway"),
    ]
    root = tmp_path / "store"
    with EditStore.init(root, method=default_method(), loaded=(copy.deepcopy(base), tok)) as store:
        before = generate(store.method, reqs[0].prompt)
        store.submit(reqs)
        store.apply_pending()
        edited = [generate(store.method, r.prompt) for r in reqs]
        assert edited[0] != before
        for r, text in zip(reqs, edited, strict=True):  # edited to the target, not merely changed
            assert text.strip().startswith(r.target_new), (r.prompt, text)
    replay = not get_method(default_method()).supports_rollback
    with EditStore.open(root, loaded=(copy.deepcopy(base), tok)) as store:
        assert [generate(store.method, r.prompt) for r in reqs] == edited
        store.rollback_after(0, replay=replay)
        assert generate(store.method, reqs[0].prompt) == before
    assert verify_store(root).ok
