"""Edit-request validation and dataset loaders (shared development files and packaged samples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lemoe.data import load_requests, load_spec, parse_data_spec, sample_path
from lemoe.requests import EditRequest, InvalidRequestError, Probe, validate_batch


def _req(**kw) -> EditRequest:
    base = {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France"}
    return EditRequest(**{**base, **kw})


def test_valid_request_round_trips_through_dict() -> None:
    r = _req(paraphrases=["France's capital is"], locality=[{"prompt": "Sky is", "answer": "blue"}])
    again = EditRequest.from_dict(r.to_dict())
    assert again == r
    assert r.locality == (Probe("Sky is", "blue"),)
    assert len(r.request_id) == 16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_new": ""}, "target_new is empty"),
        ({"target_new": "   "}, "target_new is empty"),
        ({"subject": "Germany"}, "does not occur in prompt"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"paraphrases": "not a list"}, "paraphrases must be a list"),
        ({"locality": [{"prompt": "x"}]}, "locality\\[0\\] must be an object"),
        ({"bogus": 1}, "unknown field"),
        ({"prompt": "x" * 5000, "subject": None}, "longer than"),
    ],
)
def test_from_dict_rejects_malformed(fields: dict, message: str) -> None:
    data = {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France", **fields}
    with pytest.raises(InvalidRequestError, match=message):
        EditRequest.from_dict(data, where="rec 7")


def test_error_names_the_record() -> None:
    with pytest.raises(InvalidRequestError, match="rec 7"):
        EditRequest.from_dict({"prompt": "a", "target_new": ""}, where="rec 7")


def test_batch_with_one_bad_record_is_rejected_whole() -> None:
    good = _req()
    bad = EditRequest(prompt="Who leads X?", target_new="Bob", subject="Y")  # constructed, not validated
    with pytest.raises(InvalidRequestError, match=r"batch\[1\]"):
        validate_batch([good, bad])
    with pytest.raises(InvalidRequestError, match="empty batch"):
        validate_batch([])


def test_zsre_loader_on_shared_file(shared_data: Path) -> None:
    path = shared_data / "zsre" / "zsre_dev.json"
    skipped: list[str] = []
    with pytest.warns(UserWarning, match="target_new is empty"):
        reqs = load_requests("zsre", path, skipped=skipped)
    raw = json.loads(path.read_text())
    assert len(raw) == 500 and len(reqs) == 498  # two records have an empty alt target
    assert len(skipped) == 2 and any("[262]" in s for s in skipped)
    with pytest.raises(InvalidRequestError, match="target_new is empty"):
        load_requests("zsre", path, on_invalid="error")
    assert reqs[0].target_new == raw[0]["alt"] and reqs[0].target_true == raw[0]["answers"][0]
    assert reqs[0].locality[0].prompt == raw[0]["loc"].removeprefix("nq question: ")
    answer = load_requests("zsre", path, zsre_target="answer")
    assert answer[0].target_new == raw[0]["answers"][0]


def test_loaders_are_deterministic(shared_data: Path) -> None:
    path = shared_data / "counterfact" / "counterfact_val.json"
    a = load_requests("counterfact", path, seed=3, limit=50)
    b = load_requests("counterfact", path, seed=3, limit=50)
    c = load_requests("counterfact", path, seed=4, limit=50)
    assert [r.request_id for r in a] == [r.request_id for r in b]
    assert [r.request_id for r in a] != [r.request_id for r in c]
    assert all(r.subject and r.subject in r.prompt for r in a)


@pytest.mark.parametrize(
    ("kind", "relpath", "n"),
    [
        ("counterfact", "counterfact/counterfact_train.json", 10000),
        ("hallucination", "wise/hallucination_train.json", 306),
        ("temporal", "wise/temporal_train.json", 75),
    ],
)
def test_other_loaders_on_shared_files(shared_data: Path, kind: str, relpath: str, n: int) -> None:
    reqs = load_requests(kind, shared_data / relpath)
    raw = json.loads((shared_data / relpath).read_text())
    assert len(raw) == n and n - 6 <= len(reqs) <= n  # a few WISE records have empty answers
    assert all(r.locality for r in reqs)
    if kind == "temporal":
        assert all(r.paraphrases for r in reqs)


def test_rome_counterfact_format(tmp_path: Path) -> None:
    rec = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux speaks"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    (r,) = load_requests("counterfact", path)
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert r.target_new == "English" and r.target_true == "French"
    assert r.locality == (Probe("The mother tongue of Léon Blum is", "French"),)
    assert r.request_id == "cf-0"


def test_generic_jsonl_and_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text(
        json.dumps({"prompt": "Sky is", "target_new": "green"})
        + "\n\n"
        + json.dumps({"prompt": "Grass is", "target_new": "blue", "subject": "Grass"})
        + "\n"
    )
    assert [r.target_new for r in load_requests("jsonl", path)] == ["green", "blue"]
    path.write_text(json.dumps({"prompt": "Sky is", "target_new": "green", "subject": "Sea"}) + "\n")
    with pytest.raises(InvalidRequestError, match=r"edits.jsonl\[0\]"):
        load_requests("jsonl", path)


def test_packaged_samples_and_spec() -> None:
    reqs, ident = load_spec("zsre:sample")
    assert len(reqs) == 100 and ident["kind"] == "zsre" and len(ident["sha256"]) == 64
    assert sample_path("counterfact").exists()
    with pytest.raises(ValueError, match="KIND:PATH"):
        parse_data_spec("zsre")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_requests("nope", sample_path("zsre"))
