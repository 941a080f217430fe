"""Incremental persistence (issue 28 item 3): checkpoints that write only what changed, objects that
are written once and pruned only when unreferenced, untrusted manifests, and serving replicas that
are published without copying the whole state or the base model."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lemoe.methods import METHODS, build_method
from lemoe.methods.base import EditMethod, MethodConfig, StateError
from lemoe.requests import EditRequest
from lemoe.service.replicas import ServingReplicas, shared_base_copy
from lemoe.store import EditStore, StoreCorruptError, verify_store
from lemoe.store import checkpoints as ckpt_module
from lemoe.testing import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_store import FT_OPTIONS, make_requests

WIDTH = 8


@dataclass
class GrowingConfig(MethodConfig):
    pass


class GrowingMethod(EditMethod):
    """A deterministic method whose state grows by one row per edit (like LEMoE's experts), with
    a list in its meta that grows too; declared append-only, copy-on-write, rollback by batch."""

    name = "growing"
    config_class = GrowingConfig
    supports_rollback = True
    state_copy_on_write = True
    edits_base_weights = False

    def __init__(self, model: torch.nn.Module, tokenizer: object, config: GrowingConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        self.epoch = 0
        self.reset()

    def _apply(self, requests: list[EditRequest]) -> dict[str, Any]:
        new = torch.stack([_row(r.request_id) for r in requests])
        self.rows = torch.cat([self.rows, new])
        self.batch_of = torch.cat([self.batch_of, torch.full((len(requests),), self.batches_applied)])
        self.ids = [*self.ids, *(r.request_id for r in requests)]
        return {}

    def reset(self) -> None:
        self.epoch += 1
        self.rows, self.batch_of, self.ids, self.batches_applied = torch.zeros(0, WIDTH), torch.zeros(0).long(), [], 0

    def rollback(self, batch_index: int) -> None:
        self.epoch += 1
        keep = self.batch_of != batch_index
        self.ids = [i for i, k in zip(self.ids, keep.tolist(), strict=True) if k]
        self.rows, self.batch_of = self.rows[keep], self.batch_of[keep]

    def append_only_state(self) -> dict[str, int]:
        return dict.fromkeys(("rows", "batch_of", "ids"), self.epoch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, "batch_of": self.batch_of, "scale": torch.ones(3)}

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "ids": list(self.ids)}

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if state["rows"].shape[0] != len(meta["ids"]):
            raise StateError("rows and ids differ in length")
        self.epoch += 1
        self.rows, self.batch_of, self.ids = state["rows"], state["batch_of"], list(meta["ids"])
        self.batches_applied = int(meta["batches_applied"])


def _row(request_id: str) -> torch.Tensor:
    seed = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16)
    return torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def growing(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(METHODS, "growing", f"{__name__}:GrowingMethod")
    return "growing"


def _requests(n: int, tag: str) -> list[EditRequest]:
    return [
        EditRequest(prompt=f"{tag} fact {i} is", target_new=f"value {i}", request_id=f"{tag}-{i}") for i in range(n)
    ]


def _run(store: EditStore, batches: int, tag: str = "b", per: int = 1) -> list[tuple[int, int]]:
    """Apply ``batches`` batches one at a time; (bytes, objects) each checkpoint wrote."""
    costs = []
    for i in range(batches):
        store.submit(_requests(per, f"{tag}{i}"))
        store.apply_pending()
        assert store.last_checkpoint is not None
        costs.append((store.last_checkpoint.bytes_written, store.last_checkpoint.objects_written))
    return costs


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects_in(root: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (root / "objects").iterdir()}


def _newest_state(root: Path) -> Path:
    return sorted((root / "checkpoints").iterdir())[-1] / "state.json"


def _reseal(root: Path, state_json: Path, doc: dict[str, Any]) -> None:
    """Rewrite a checkpoint's state.json and its journal checksum, as an attacker who knows the format."""
    state_json.write_text(json.dumps(doc))
    ckpt_id = int(state_json.parent.name.split("-")[1])
    conn = sqlite3.connect(root / "journal.sqlite")
    sha = hashlib.sha256(state_json.read_bytes()).hexdigest()
    conn.execute("UPDATE checkpoints SET state_sha256 = ? WHERE ckpt_id = ?", (sha, ckpt_id))
    conn.commit()
    conn.close()


@pytest.fixture
def grown(tmp_path: Path, tokenizer: object, growing: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store of the growing method after 12 single-edit batches, with a small packing fanout so the
    log has several levels of index objects."""
    monkeypatch.setattr(ckpt_module, "FANOUT", 2)
    root = tmp_path / "store"
    with EditStore.init(root, model="tiny-llama", method=growing, loaded=(tiny_model("llama"), tokenizer)) as store:
        _run(store, 12)
    return root


def test_lemoe_checkpoint_cost_does_not_grow_with_batches(tmp_path: Path, tokenizer: object) -> None:
    """One frozen expert per batch: every checkpoint after the first writes one new object (the
    batch's segment; every 16th also a log index), and about the same bytes, at batch 2 as at 20."""
    root = tmp_path / "store"
    with EditStore.init(
        root, model="tiny-llama", method="lemoe", options={"steps": 1}, loaded=(tiny_model("llama"), tokenizer)
    ) as store:
        costs = _run(store, 20)
        state = {k: v.clone() for k, v in store.method.state_dict().items()}
        meta = store.method.state_meta()
    sizes = [b for b, _ in costs]
    assert costs[19][1] <= costs[1][1] == 1
    assert all(n <= 2 for _, n in costs[1:])
    assert max(sizes[1:]) <= 1.25 * sizes[1] and sizes[19] <= 1.1 * sizes[1]
    assert verify_store(root).ok
    with EditStore.open(root, loaded=(tiny_model("llama"), tokenizer)) as store:
        again = store.method.state_dict()
        assert store.method.state_meta() == meta
        assert all(torch.equal(state[k], again[k]) for k in state)


def test_multi_level_log_reopens_exactly_and_rollback_restarts_it(grown: Path, tokenizer: object) -> None:
    with EditStore.open(grown, loaded=(tiny_model("llama"), tokenizer)) as store:
        assert store.method.ids == [f"b{i}-0" for i in range(12)]
        assert torch.equal(store.method.rows, torch.stack([_row(f"b{i}-0") for i in range(12)]))
        doc = json.loads(_newest_state(grown).read_text())
        assert len(doc["log"]["levels"]) >= 3  # 12 segments at fanout 2: index objects of levels 1-3
        assert _run(store, 1, tag="c")[0][1] == 1  # incremental after a reopen too
        store.rollback([3])  # epoch bump: the log restarts with one segment of everything
        assert store.last_checkpoint is not None and store.last_checkpoint.objects_written == 1
        expected = [f"b{i}-0" for i in range(12) if i != 2] + ["c0-0"]
        assert store.method.ids == expected
        _run(store, 3, tag="d")  # old segments roll off with the pruned checkpoints
        report = verify_store(grown)
        assert report.ok and not any("references it" in w for w in report.warnings)
        assert _objects_in(grown) == _referenced(grown)
    with EditStore.open(grown, loaded=(tiny_model("llama"), tokenizer)) as store:
        assert store.method.ids == expected + [f"d{i}-0" for i in range(3)]


def _referenced(root: Path) -> set[str]:
    from lemoe.store.journal import list_checkpoints

    c = ckpt_module.Checkpoints(root)
    conn = sqlite3.connect(root / "journal.sqlite")
    try:
        rows = list_checkpoints(conn)
    finally:
        conn.close()
    out: set[str] = set()
    for r in rows:
        out |= c.checkpoint_meta(root / "checkpoints" / r.dirname, r.state_sha256, r.config_sha256)[1]
    return out


def test_objects_of_kept_checkpoints_are_never_pruned(grown: Path, tokenizer: object) -> None:
    referenced = _referenced(grown)
    assert referenced and _objects_in(grown) == referenced  # pruning left exactly what is referenced
    (grown / "objects" / "notes.txt").write_text("mine")
    debris = grown / "objects" / f"{'0' * 64}.safetensors"
    debris.write_bytes(b"killed write")
    report = verify_store(grown)
    assert report.ok
    assert any("notes.txt: not written by the store" in w for w in report.warnings)
    assert any(f"{debris}: no checkpoint references it" in w for w in report.warnings)
    EditStore.open(grown, loaded=(tiny_model("llama"), tokenizer)).close()  # open sweeps debris only
    assert not debris.exists() and (grown / "objects" / "notes.txt").read_text() == "mine"
    assert _objects_in(grown) - {"notes"} == referenced


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_corrupt_object_is_reported_and_refused(grown: Path, tokenizer: object, damage: str) -> None:
    doc = json.loads(_newest_state(grown).read_text())
    name = doc["log"]["levels"][0][-1]["object"] if doc["log"]["levels"][0] else doc["full"]["scale"]["object"]
    path = grown / "objects" / f"{name}.safetensors"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-10])
    before = _files(grown)
    report = verify_store(grown)
    message = "is missing" if damage == "missing" else "checksum differs from its name"
    assert not report.ok and any(str(path) in p and message in p for p in report.problems)
    with pytest.raises(StoreCorruptError, match=message) as err:
        EditStore.open(grown, loaded=(tiny_model("llama"), tokenizer))
    assert str(path) in str(err.value)
    after = _files(grown)
    after.pop("writer.lock", None), before.pop("writer.lock", None)
    assert after == before  # nothing changed


@pytest.mark.parametrize("where", ["full", "segment", "index"])
@pytest.mark.parametrize("name", ["../../victim", "/tmp/victim", "A" * 64, "ckpt-00000001"])
def test_manifest_naming_an_object_outside_objects_is_refused(
    grown: Path, tokenizer: object, tmp_path: Path, where: str, name: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("user data")
    state_json = _newest_state(grown)
    doc = json.loads(state_json.read_text())
    target = name.replace("/tmp/victim", str(victim))
    if where == "full":
        doc["full"]["scale"]["object"] = target
    elif where == "segment":
        doc["log"]["levels"][0] = [{"object": target, "rows": {"rows": 1}, "items": {}}]
    else:
        doc["log"]["levels"][-1][0] = target
    _reseal(grown, state_json, doc)
    before = _files(grown)
    report = verify_store(grown)
    assert not report.ok and any("not a sha256 under objects/" in p and str(state_json) in p for p in report.problems)
    with pytest.raises(StoreCorruptError, match="not a sha256 under objects/"):
        EditStore.open(grown, loaded=(tiny_model("llama"), tokenizer))
    assert victim.read_text() == "user data"
    after = _files(grown)
    after.pop("writer.lock", None), before.pop("writer.lock", None)
    assert after == before


def test_old_full_checkpoints_still_load(grown: Path, tokenizer: object) -> None:
    """A checkpoint in the layout before objects/ (config.json + state.safetensors) opens, and the
    next checkpoint is written incrementally on top of the store."""
    with EditStore.open(grown, loaded=(tiny_model("llama"), tokenizer)) as store:
        ids = list(store.method.ids)
        folder = sorted((grown / "checkpoints").iterdir())[-1]
        store.method.save_pretrained(folder)
    (folder / "state.json").unlink()
    sha = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("state.safetensors", "config.json")}
    conn = sqlite3.connect(grown / "journal.sqlite")
    conn.execute(
        "UPDATE checkpoints SET state_sha256 = ?, config_sha256 = ? WHERE dirname = ?",
        (sha["state.safetensors"], sha["config.json"], folder.name),
    )
    conn.commit()
    conn.close()
    assert verify_store(grown).ok
    with EditStore.open(grown, loaded=(tiny_model("llama"), tokenizer)) as store:
        assert store.method.ids == ids
        _run(store, 4, tag="n")
        assert store.method.ids == ids + [f"n{i}-0" for i in range(4)]
    assert verify_store(grown).ok


def _greedy(method: EditMethod, prompts: list[str]) -> list[str]:
    from lemoe.evaluation.scorers import greedy_generate

    with torch.no_grad():
        ids = [method.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]  # type: ignore[operator]
        new = greedy_generate(
            method.model, method.tokenizer, ids, [6] * len(ids), batch_size=len(ids), context=method.forward_context
        )
    return [method.tokenizer.decode(n, skip_special_tokens=True) for n in new]  # type: ignore[attr-defined]


def test_shared_base_copy_shares_weights_not_hooks(tokenizer: object) -> None:
    model = tiny_model("llama")
    writer = build_method("lemoe", model, tokenizer, {"steps": 1})
    copy = shared_base_copy(model)
    assert all(a is b for a, b in zip(model.parameters(), copy.parameters(), strict=True))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in copy.modules())
    assert writer._handles and any(m._forward_hooks for m in model.modules())
    replica = build_method("lemoe", copy, tokenizer, {"steps": 1})
    assert replica.base_fingerprint == writer.base_fingerprint


@pytest.mark.parametrize("method", ["lemoe", "ft-m"])
def test_replicas_after_incremental_publishes_generate_as_a_full_reload(
    tmp_path: Path, tokenizer: object, method: str
) -> None:
    options = {"steps": 2} if method == "lemoe" else FT_OPTIONS
    store = EditStore.init(
        tmp_path / "store", model="tiny-llama", method=method, options=options, loaded=(tiny_model("llama"), tokenizer)
    )
    try:
        if method == "lemoe":
            replicas = ServingReplicas(
                lambda: build_method(method, shared_base_copy(store.method.model), tokenizer, options)
            )
        else:
            replicas = ServingReplicas(lambda: build_method(method, tiny_model("llama"), tokenizer, options))
        requests = make_requests(6)
        prompts = [r.prompt for r in requests[:4]] + ["The capital of France is"]
        version = 0

        def publish() -> None:
            nonlocal version
            version += 1
            replicas.publish(store.method.state_dict(), store.method.state_meta(), version)

        publish()
        for i in range(0, 6, 2):
            store.submit(requests[i : i + 2])
            store.apply_pending()
            publish()
            if method == "lemoe":
                assert replicas.last_publish["copied_bytes"] == 0 and replicas.last_publish["shared"]
                if i:  # each replica has had a full load: unchanged keys are not given again
                    assert "router.mean" not in replicas.last_publish["changed_keys"]
        store.rollback([2], replay=method != "lemoe")
        publish()
        fresh = build_method(method, tiny_model("llama"), tokenizer, options)
        fresh.load_state_dict({k: v.clone() for k, v in store.method.state_dict().items()}, store.method.state_meta())
        texts, got_version = replicas.generate(prompts, [6] * len(prompts))
        assert got_version == version
        assert texts == _greedy(fresh, prompts)
        assert texts == _greedy(store.method, prompts)
    finally:
        store.close()


def test_serve_replica_factory_shares_the_base_only_where_the_method_allows(tmp_path: Path, tokenizer: object) -> None:
    from lemoe.service.replicas import replica_factory

    with EditStore.init(
        tmp_path / "lemoe",
        model="tiny-llama",
        method="lemoe",
        options={"steps": 1},
        loaded=(tiny_model("llama"), tokenizer),
    ) as store:
        replica = replica_factory(store)()
        assert all(a is b for a, b in zip(store.method.model.parameters(), replica.model.parameters(), strict=True))
        assert replica.model is not store.method.model and replica.tokenizer is not store.method.tokenizer
    with (
        EditStore.init(
            tmp_path / "ftm",
            model="tiny-llama",
            method="ft-m",
            options=FT_OPTIONS,
            loaded=(tiny_model("llama"), tokenizer),
        ) as store,
        pytest.raises(ValueError, match="edits the base weights"),
    ):
        replica_factory(store, share_base=True)


def test_batch_lists_are_stored_as_runs_and_read_as_untrusted() -> None:
    from lemoe.store.journal import decode_batches, encode_batches

    for batches in ([], [4], list(range(1, 5001)), [1, 3, 4, 5, 9]):
        assert list(decode_batches(encode_batches(batches), "t")) == batches
    assert encode_batches(list(range(1, 5001))) == [[1, 5000]]  # a checkpoint's batch list stays small
    assert decode_batches([1, 2, 3], "old") == (1, 2, 3)  # the older plain form
    for bad in ([[0, 10**12]], [[5, 1]], [[1, 2, 3]], ["1"], [1.5], {"a": 1}):
        with pytest.raises(StoreCorruptError, match="batch list"):
            decode_batches(bad, "journal: checkpoint 1")
