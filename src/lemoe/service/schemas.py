"""The service's request and response bodies as pydantic models: what ``/openapi.json`` publishes.

Requests are validated with these models (strict types: ``true`` is not an integer, unknown fields
are refused) after the service has read and decoded the JSON itself, so every failure keeps its own
error code. An edit's *meaning* (the subject inside the prompt, sane text, no duplicate ids) is
then checked by :func:`lemoe.store.parse_submission`, the one validator every way in shares.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- errors ------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. invalid_request, too_large")
    message: str
    type: str = Field(description="OpenAI's error type for the status, e.g. invalid_request_error")
    param: str | None = Field(None, description="the offending field, when one is to blame")


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- edits -------------------------------------------------------------------------------------------
class ProbeIn(_Strict):
    prompt: str
    answer: str


class EditRequestIn(_Strict):
    """One edit: ``prompt`` must contain ``subject`` (when given); ``target_new`` is the new answer."""

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    paraphrases: list[str] = []
    locality: list[ProbeIn] = []
    portability: list[ProbeIn] = []
    same_subject: list[str] = []
    request_id: str | None = Field(None, description="idempotency key; default: a hash of the content")


class SubmitIn(_Strict):
    requests: list[EditRequestIn]


class SubmittedEdit(BaseModel):
    seq: int
    request_id: str
    duplicate: bool = Field(description="true: this request was already in the journal (idempotent resubmit)")


class SubmitOut(BaseModel):
    edits: list[SubmittedEdit]


class EditOut(BaseModel):
    seq: int
    request_id: str
    status: str
    batch: int | None
    submitted_at: float
    applied_at: float | None
    rolled_back_at: float | None
    request: dict[str, object]


class EditsOut(BaseModel):
    edits: list[EditOut]


class BatchOut(BaseModel):
    batch: int
    status: str
    created_at: float
    applied_at: float | None
    rolled_back_at: float | None


class BatchesOut(BaseModel):
    batches: list[BatchOut]


class RollbackIn(_Strict):
    """Exactly one of ``batch`` (undo that batch) or ``after`` (undo every batch after it)."""

    batch: int | None = Field(None, ge=0, le=2**62)
    after: int | None = Field(None, ge=0, le=2**62)
    replay: bool = Field(False, description="rebuild from the journal for methods that cannot undo in place")


class RollbackOut(BaseModel):
    rolled_back: list[int]


class StoreOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    store: str
    model: str
    method: str
    supports_rollback: bool
    edits_per_step: int
    edits: dict[str, int]
    live_batches: int
    latest_checkpoint: int | None
    writer_busy: bool
    writer_error: str | None
    state_version: int


class HealthOut(BaseModel):
    status: Literal["ok"]


# -- generation --------------------------------------------------------------------------------------
class GenerateIn(_Strict):
    prompt: str
    max_new_tokens: int | None = None
    model: Literal["edited", "base"] = Field("edited", description='"base": the model before any edit')


class GenerateOut(BaseModel):
    text: str
    state_version: int = Field(description="the published edit state that answered (0: the unedited model)")
    model: Literal["edited", "base"]
