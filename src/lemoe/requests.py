"""Typed edit requests and their validation.

An edit request says: given ``prompt``, the model should now answer ``target_new``. Everything the
evaluator needs to judge the edit travels with it (paraphrases, locality and portability probes,
prompts about other facts of the same subject).
Validation runs over a whole batch before any method sees it, so a batch with one bad record is
rejected whole and nothing is applied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


class InvalidRequestError(ValueError):
    """A request (or a batch holding one) is malformed; the message names the record and field."""


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected after it (locality or portability)."""

    prompt: str
    answer: str


# Fields newer than the request format's first release: absent from to_dict (and so from
# content_hash and request_id) while empty.
OMITTED_WHEN_EMPTY = ("same_subject",)


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    request_id: str = ""
    # Prompts about other facts of ``subject`` (answers come from the unedited model at evaluation).
    same_subject: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Normalise list inputs to tuples so requests stay hashable and immutable.
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "same_subject", tuple(self.same_subject))
        object.__setattr__(self, "locality", tuple(p if isinstance(p, Probe) else Probe(**p) for p in self.locality))
        object.__setattr__(
            self,
            "portability",
            tuple(p if isinstance(p, Probe) else Probe(**p) for p in self.portability),
        )
        if not self.request_id:
            object.__setattr__(self, "request_id", self.content_hash()[:16])

    def content_hash(self) -> str:
        """The edit's identity: what is edited and how it is judged, except ``same_subject``, which
        loaders derive from templates (changing the templates must not rename every edit)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in ("request_id", "same_subject")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields. Optional fields added after the first release are left out while
        empty, so a request without them serialises (and hashes, and journals) exactly as before."""
        d = asdict(self)
        d["paraphrases"] = list(self.paraphrases)
        d["locality"] = [asdict(p) for p in self.locality]
        d["portability"] = [asdict(p) for p in self.portability]
        d["same_subject"] = list(self.same_subject)
        for name in OMITTED_WHEN_EMPTY:
            if not d[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "request") -> EditRequest:
        """Build and validate a request from plain JSON-like data."""
        if not isinstance(data, Mapping):
            raise InvalidRequestError(f"{where}: expected an object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"{where}: unknown field(s) {sorted(unknown)}")
        kwargs = dict(data)
        for name in ("locality", "portability"):
            probes = kwargs.get(name, ())
            if not isinstance(probes, (list, tuple)):
                raise InvalidRequestError(f"{where}: {name} must be a list of {{prompt, answer}}")
            checked = []
            for j, p in enumerate(probes):
                if isinstance(p, Probe):
                    checked.append(p)
                    continue
                if not isinstance(p, Mapping) or set(p) != {"prompt", "answer"}:
                    raise InvalidRequestError(f"{where}: {name}[{j}] must be an object with exactly prompt and answer")
                checked.append(Probe(prompt=p["prompt"], answer=p["answer"]))
            kwargs[name] = tuple(checked)
        for name in ("paraphrases", "same_subject"):
            if name in kwargs and not isinstance(kwargs[name], (list, tuple)):
                raise InvalidRequestError(f"{where}: {name} must be a list of strings")
        try:
            req = cls(**kwargs)
        except TypeError as e:  # missing required field
            raise InvalidRequestError(f"{where}: {e}") from None
        validate_request(req, where=where)
        return req


def _check_text(value: object, name: str, where: str, *, max_chars: int) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}: {name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequestError(f"{where}: {name} is empty")
    if len(value) > max_chars:
        raise InvalidRequestError(f"{where}: {name} is longer than {max_chars} characters")
    if "\x00" in value:
        raise InvalidRequestError(f"{where}: {name} contains a NUL character")


MAX_PROMPT_CHARS = 4000
MAX_TARGET_CHARS = 4000


def validate_request(req: EditRequest, *, where: str = "request") -> None:
    """Raise :class:`InvalidRequestError` naming the record and field if ``req`` is malformed."""
    _check_text(req.prompt, "prompt", where, max_chars=MAX_PROMPT_CHARS)
    _check_text(req.target_new, "target_new", where, max_chars=MAX_TARGET_CHARS)
    if req.subject is not None:
        _check_text(req.subject, "subject", where, max_chars=MAX_PROMPT_CHARS)
        if req.subject not in req.prompt:
            raise InvalidRequestError(f"{where}: subject {req.subject!r} does not occur in prompt {req.prompt!r}")
    if req.target_true is not None:
        _check_text(req.target_true, "target_true", where, max_chars=MAX_TARGET_CHARS)
    for name in ("paraphrases", "same_subject"):
        for j, p in enumerate(getattr(req, name)):
            _check_text(p, f"{name}[{j}]", where, max_chars=MAX_PROMPT_CHARS)
    for kind in ("locality", "portability"):
        for j, probe in enumerate(getattr(req, kind)):
            _check_text(probe.prompt, f"{kind}[{j}].prompt", where, max_chars=MAX_PROMPT_CHARS)
            _check_text(probe.answer, f"{kind}[{j}].answer", where, max_chars=MAX_TARGET_CHARS)


def validate_batch(requests: Iterable[EditRequest]) -> list[EditRequest]:
    """Validate every request of a batch; raise on the first bad one, before anything is applied."""
    batch = list(requests)
    if not batch:
        raise InvalidRequestError("empty batch: nothing to edit")
    for i, req in enumerate(batch):
        if not isinstance(req, EditRequest):
            raise InvalidRequestError(f"batch[{i}]: expected EditRequest, got {type(req).__name__}")
        validate_request(req, where=f"batch[{i}] ({req.request_id})")
    return batch


def prompts_of(requests: Sequence[EditRequest]) -> list[str]:
    return [r.prompt for r in requests]


@dataclass
class RequestSet:
    """Requests with the identity of where they came from (for results files)."""

    requests: list[EditRequest]
    source: dict[str, Any] = field(default_factory=dict)
