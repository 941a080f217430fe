"""Validation of untrusted edit submissions (the service's request bodies, JSON files for the CLI).

Everything that reaches the journal passes here first. The only exception it raises is
:class:`InvalidRequestError`, with a message naming the record and field; on top of the library's
request validation it bounds counts and lengths and refuses text SQLite or the tokenizer cannot
store faithfully (lone surrogates, NUL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lemoe.requests import EditRequest, InvalidRequestError

MAX_REQUESTS_PER_SUBMIT = 64
MAX_REQUEST_ID_CHARS = 200
MAX_LIST_ITEMS = 32  # paraphrases / locality / portability per request


def _check_strings(value: Any, where: str, depth: int = 0) -> None:
    """Refuse deep nesting and strings that are not valid Unicode scalar sequences."""
    if depth > 4:
        raise InvalidRequestError(f"{where}: nested too deeply")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(f"{where}: contains an invalid Unicode character (lone surrogate)") from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_strings(k, where, depth + 1)
            _check_strings(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST_ITEMS:
            raise InvalidRequestError(f"{where}: more than {MAX_LIST_ITEMS} items")
        for i, v in enumerate(value):
            _check_strings(v, f"{where}[{i}]", depth + 1)


def parse_request(data: Any, where: str = "request") -> EditRequest:
    """One untrusted JSON value -> a validated :class:`EditRequest`."""
    if not isinstance(data, Mapping):
        raise InvalidRequestError(f"{where}: expected an object, got {type(data).__name__}")
    _check_strings(data, where)
    rid = data.get("request_id", "")
    if not isinstance(rid, str):
        raise InvalidRequestError(f"{where}: request_id must be a string, got {type(rid).__name__}")
    if len(rid) > MAX_REQUEST_ID_CHARS or any(not c.isprintable() for c in rid):
        raise InvalidRequestError(f"{where}: request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    for name in ("subject", "target_true"):
        if name in data and data[name] is not None and not isinstance(data[name], str):
            raise InvalidRequestError(f"{where}: {name} must be a string or null")
    try:
        return EditRequest.from_dict(data, where=where)
    except InvalidRequestError:
        raise
    except (TypeError, ValueError, AttributeError) as e:  # anything the dataclass itself trips on
        raise InvalidRequestError(f"{where}: {e}") from None


def parse_submission(payload: Any, *, max_requests: int = MAX_REQUESTS_PER_SUBMIT) -> list[EditRequest]:
    """``{"requests": [...]}``, a list of request objects or one request object -> validated requests.

    All or nothing: one bad record rejects the whole submission.
    """
    if isinstance(payload, Mapping) and set(payload) == {"requests"}:
        items = payload["requests"]
        if not isinstance(items, list):
            raise InvalidRequestError("requests must be a list of request objects")
    elif isinstance(payload, list):
        items = payload
    elif isinstance(payload, Mapping):
        items = [payload]
    else:
        raise InvalidRequestError(f"expected a request object or {{'requests': [...]}}, got {type(payload).__name__}")
    if not items:
        raise InvalidRequestError("empty submission: nothing to edit")
    if len(items) > max_requests:
        raise InvalidRequestError(f"at most {max_requests} requests per submission, got {len(items)}")
    requests = [parse_request(item, where=f"requests[{i}]") for i, item in enumerate(items)]
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError("the submission holds the same request_id twice")
    return requests
