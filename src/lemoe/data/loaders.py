"""Loaders for the standard editing datasets, all producing :class:`EditRequest` lists.

Every loader is deterministic: the same file (and seed, where a shuffle is asked for) gives the
same requests in the same order. Records are validated as they are read, and a bad record raises
an error naming the file and record index.

The dataset loaders (ZsRE, CounterFact, hallucination, temporal) also attach ``same_subject``
prompts: a record's own ``same_subject`` list when it has one, else prompts derived from its
subject with :func:`lemoe.data.probes.same_subject_prompts`. The generic JSON(L) loader takes
request fields verbatim and derives nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from lemoe.data.probes import same_subject_prompts
from lemoe.requests import EditRequest, InvalidRequestError, Probe

ZsreTarget = Literal["alt", "answer"]


def _read_records(path: str | Path) -> list[Any]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise InvalidRequestError(f"{path}: expected a JSON list of records")
    return data


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _strip_nq(prompt: str) -> str:
    # MEND's ZsRE locality prompts carry an "nq question: " tag and no question mark.
    return prompt[len("nq question: ") :] if prompt.startswith("nq question: ") else prompt


def _same_subject(rec: Mapping[str, Any], subject: str | None, prompts: Iterable[str]) -> tuple[str, ...]:
    """The record's explicit ``same_subject`` prompts (checked here: a string would split into
    characters), or the templates derived from its subject."""
    if "same_subject" not in rec:
        return same_subject_prompts(subject, prompts)
    given = rec["same_subject"]
    if not isinstance(given, list) or not all(isinstance(p, str) and p.strip() for p in given):
        raise InvalidRequestError(f"same_subject must be a list of non-empty strings, got {given!r:.80}")
    return tuple(given)


def zsre_record(rec: Mapping[str, Any], target: ZsreTarget = "alt") -> EditRequest:
    """MEND-format ZsRE: edit toward ``alt`` (EasyEdit/WISE) or ``answers[0]`` (ROME/MEMIT)."""
    answers = rec.get("answers") or []
    new = rec["alt"] if target == "alt" else answers[0]
    loc = (Probe(_strip_nq(rec["loc"]), rec["loc_ans"]),) if rec.get("loc") else ()
    subject = rec.get("subject")
    subject = subject if subject and subject in rec["src"] else None
    paraphrases = (rec["rephrase"],) if rec.get("rephrase") else ()
    return EditRequest(
        prompt=rec["src"],
        target_new=new,
        subject=subject,
        target_true=answers[0] if answers and target == "alt" else None,
        paraphrases=paraphrases,
        locality=loc,
        same_subject=_same_subject(rec, subject, (rec["src"], *paraphrases)),
    )


def counterfact_record(rec: Mapping[str, Any]) -> EditRequest:
    """CounterFact in EasyEdit's simplified format or ROME's original ``requested_rewrite`` format."""
    if "requested_rewrite" in rec:
        rw = rec["requested_rewrite"]
        prompt = rw["prompt"].format(rw["subject"])
        neighbours = rec.get("neighborhood_prompts", [])
        true = rw["target_true"]["str"]
        paraphrases = tuple(rec.get("paraphrase_prompts", []))
        return EditRequest(
            prompt=prompt,
            target_new=rw["target_new"]["str"],
            subject=rw["subject"],
            target_true=true,
            paraphrases=paraphrases,
            # ROME's neighbourhood prompts are about other subjects sharing the true attribute.
            locality=tuple(Probe(p, true) for p in neighbours),
            request_id=f"cf-{rec['case_id']}" if "case_id" in rec else "",
            same_subject=_same_subject(rec, rw["subject"], (prompt, *paraphrases)),
        )
    rephrase = rec.get("rephrase_prompt")
    paraphrases = (rephrase,) if rephrase else ()
    return EditRequest(
        prompt=rec["prompt"],
        target_new=rec["target_new"],
        subject=rec.get("subject"),
        target_true=rec.get("ground_truth"),
        paraphrases=paraphrases,
        locality=(Probe(rec["locality_prompt"], rec["locality_ground_truth"]),) if rec.get("locality_prompt") else (),
        request_id=f"cf-{rec['case_id']}" if "case_id" in rec else "",
        same_subject=_same_subject(rec, rec.get("subject"), (rec["prompt"], *paraphrases)),
    )


def hallucination_record(rec: Mapping[str, Any]) -> EditRequest:
    """WISE hallucination set: scored by perplexity of ``target_new``."""
    subject = rec.get("subject")
    subject = subject if subject and subject in rec["prompt"] else None
    return EditRequest(
        prompt=rec["prompt"],
        target_new=rec["target_new"],
        subject=subject,
        locality=(Probe(rec["locality_prompt"], rec["locality_ground_truth"]),) if rec.get("locality_prompt") else (),
        same_subject=_same_subject(rec, subject, (rec["prompt"],)),
    )


def temporal_record(rec: Mapping[str, Any]) -> EditRequest:
    """WISE temporal set: ``ood_rephrase`` is the out-of-distribution generality probe."""
    subject = rec.get("subject")
    subject = subject if subject and subject in rec["prompt"] else None
    paraphrases = (rec["ood_rephrase"],) if rec.get("ood_rephrase") else ()
    return EditRequest(
        prompt=rec["prompt"],
        target_new=rec["target_new"],
        subject=subject,
        paraphrases=paraphrases,
        locality=(Probe(rec["locality_prompt"], rec["locality_ground_truth"]),) if rec.get("locality_prompt") else (),
        same_subject=_same_subject(rec, subject, (rec["prompt"], *paraphrases)),
    )


def generic_record(rec: Mapping[str, Any]) -> EditRequest:
    """A JSON object of :class:`EditRequest` fields."""
    return EditRequest.from_dict(rec)


LOADERS: dict[str, Callable[[Mapping[str, Any]], EditRequest]] = {
    "zsre": zsre_record,
    "counterfact": counterfact_record,
    "hallucination": hallucination_record,
    "temporal": temporal_record,
    "jsonl": generic_record,
    "json": generic_record,
}


def load_requests(
    kind: str,
    path: str | Path,
    *,
    limit: int | None = None,
    seed: int | None = None,
    zsre_target: ZsreTarget = "alt",
    on_invalid: Literal["skip", "error"] = "skip",
    skipped: list[str] | None = None,
) -> list[EditRequest]:
    """Read ``path`` as dataset ``kind``; optionally shuffle with ``seed`` and keep ``limit``.

    Public datasets hold a few unusable records (ZsRE dev has two empty ``alt`` targets). With
    ``on_invalid="skip"`` (default) such records are left out with a warning and their reasons are
    appended to ``skipped``; with ``"error"`` the first one raises. Structurally malformed records
    (missing fields) always raise."""
    if kind not in LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {sorted(LOADERS)}")
    records = _read_records(path)
    convert = LOADERS[kind]
    requests: list[EditRequest] = []
    invalid: list[str] = []
    for i, rec in enumerate(records):
        try:
            req = zsre_record(rec, zsre_target) if kind == "zsre" else convert(rec)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise InvalidRequestError(f"{path}[{i}]: malformed {kind} record ({e!r})") from None
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{path}[{i}]: {e}") from None
        try:
            EditRequest.from_dict(req.to_dict(), where=f"{path}[{i}]")
        except InvalidRequestError as e:
            if on_invalid == "error" or kind in ("jsonl", "json"):
                raise
            invalid.append(str(e))
            continue
        requests.append(req)
    if invalid:
        warnings.warn(f"skipped {len(invalid)} invalid record(s) of {path}; first: {invalid[0]}", stacklevel=2)
        if skipped is not None:
            skipped.extend(invalid)
    return select(requests, limit=limit, seed=seed)


def select(requests: list[EditRequest], *, limit: int | None, seed: int | None) -> list[EditRequest]:
    """Deterministic subset: shuffle with ``seed`` if given (else keep file order), then truncate."""
    out = list(requests)
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out[:limit] if limit is not None else out


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``KIND:PATH`` (``zsre:/data/zsre.json``); ``KIND:sample`` names the packaged sample."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"--data expects KIND:PATH, got {spec!r}")
    return kind, path


def sample_path(kind: str) -> Path:
    """The small sample shipped inside the package (``zsre`` or ``counterfact``)."""
    name = {"zsre": "zsre_sample.json", "counterfact": "counterfact_sample.json"}.get(kind)
    if name is None:
        raise ValueError(f"no packaged sample for {kind!r} (have zsre, counterfact)")
    return Path(str(resources.files("lemoe.data") / "samples" / name))


def load_spec(spec: str, **kwargs: Any) -> tuple[list[EditRequest], dict[str, Any]]:
    """Load ``KIND:PATH`` and return the requests with the data identity for a results file."""
    kind, path = parse_data_spec(spec)
    resolved = sample_path(kind) if path == "sample" else Path(path)
    skipped: list[str] = []
    requests = load_requests(kind, resolved, skipped=skipped, **kwargs)
    identity = {"kind": kind, "path": str(resolved), "sha256": file_sha256(resolved), "skipped_records": skipped}
    return requests, identity


def iter_texts(path: str | Path) -> Iterable[str]:
    """Plain text lines of a corpus file (for statistics), skipping blanks."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")
