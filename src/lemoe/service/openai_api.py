"""OpenAI-compatible endpoints, so a client a team already has talks to the edited model.

``POST /v1/chat/completions`` (messages through the tokenizer's chat template) and
``POST /v1/completions`` (raw text), each non-streaming or ``"stream": true`` as server-sent
events in OpenAI's chunk format, ending with ``data: [DONE]``; ``GET /v1/models`` lists what can be
asked. Requests that arrive together share one forward pass per step (:mod:`lemoe.service.generation`).

Models: ``"edited"`` (also the store's model name) is the edited model with the newest published
state; ``"base"`` is the model before any edit. Decoding is greedy, as everywhere in lemoe's
evaluation: ``temperature`` must be omitted or 0 and ``top_p`` omitted or 1, and ``n`` is 1; any
other OpenAI parameter is refused by name, not silently ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lemoe.service.app import Body, _validation_message, first_param
from lemoe.service.errors import ApiError
from lemoe.service.generation import GenerationJob, GenerationResult, NoChatTemplateError

if TYPE_CHECKING:
    from lemoe.service.server import EditService


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=0, description="greedy decoding: omit or 0")
    top_p: float | None = Field(None, ge=1, le=1, description="greedy decoding: omit or 1")
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    user: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionIn(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionIn(_Request):
    prompt: str


OPENAI_BODY_MODELS: list[type[BaseModel]] = [ChatCompletionIn, CompletionIn]


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openai_router(service: EditService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])
    config = service.config
    store_model = service.store.spec.model

    def resolve(name: str) -> str:
        if name in ("edited", store_model):
            return "edited"
        if name == "base":
            return "base"
        raise ApiError(404, "model_not_found", f"model {name!r}: ask 'edited' (or {store_model!r}) or 'base'", "model")

    def parse(model: type[_Request], payload: Any) -> Any:
        try:
            body = model.model_validate(payload)
        except ValidationError as e:
            raise ApiError(422, "invalid_request", _validation_message(e.errors()), first_param(e.errors())) from None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(422, "invalid_request", "stop: at most 4 non-empty strings", "stop")
        return body

    def limit(asked: int | None) -> int:
        n = asked if asked is not None else config.max_new_tokens
        if n > config.max_new_tokens:
            raise ApiError(422, "invalid_request", f"max_tokens must be at most {config.max_new_tokens}", "max_tokens")
        return n

    @router.get("/models")
    def models() -> dict[str, Any]:
        """The models this server answers for (OpenAI's list format)."""
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": "edited", "object": "model", "created": now, "owned_by": f"lemoe:{store_model}"},
                {"id": "base", "object": "model", "created": now, "owned_by": f"lemoe:{store_model}"},
            ],
        }

    @router.post("/chat/completions", openapi_extra=_documented(ChatCompletionIn))
    async def chat_completions(payload: Body) -> Any:
        """OpenAI chat completion by the edited (or base) model, through the tokenizer's chat template."""
        body = parse(ChatCompletionIn, payload)
        if not getattr(service.store.method.tokenizer, "chat_template", None):
            raise ApiError(400, "no_chat_template", "this model's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _answer(service, body, resolve(body.model), messages, limit(asked), chat=True)

    @router.post("/completions", openapi_extra=_documented(CompletionIn))
    async def completions(payload: Body) -> Any:
        """OpenAI text completion of ``prompt`` by the edited (or base) model."""
        body = parse(CompletionIn, payload)
        service.check_prompt(body.prompt, "invalid_request")
        return await _answer(service, body, resolve(body.model), body.prompt, limit(body.max_tokens), chat=False)

    return router


async def _answer(service: EditService, body: Any, model: str, prompt: Any, n: int, *, chat: bool) -> Any:
    if chat:
        limit = service.config.max_prompt_chars
        if any(len(m["content"]) > limit for m in prompt):
            raise ApiError(422, "invalid_request", f"a message is over {limit} characters", "messages")
    stops = tuple([body.stop] if isinstance(body.stop, str) else (body.stop or []))
    kind = "chat.completion" if chat else "text_completion"
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        job = GenerationJob(prompt, n, chat=chat, model=model, stop_strings=stops)
        result = await _result(service.generator.submit(job))
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice |= {"text": result.text, "logprobs": None}
        return {
            "id": ident,
            "object": kind,
            "created": created,
            "model": body.model,
            "system_fingerprint": f"lemoe-state-{result.state_version}",
            "choices": [choice],
            "usage": _usage(result),
        }

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()

    def on_text(piece: str) -> None:  # on the generation thread
        with contextlib.suppress(RuntimeError):  # the server's loop is gone (shutdown): nobody listens
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

    job = GenerationJob(prompt, n, chat=chat, model=model, stop_strings=stops, on_text=on_text)
    future = asyncio.wrap_future(service.generator.submit(job))
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: str | None, finish: str | None, *, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        data = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": body.model}
        return _event({**data, "choices": [choice]})

    async def events() -> AsyncIterator[str]:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield chunk(getter.result(), None)
                continue
            getter.cancel()
            break
        while not pieces.empty():
            yield chunk(pieces.get_nowait(), None)
        try:
            result = future.result()
        except Exception as e:  # after the headers: the error travels as an event
            yield _event(
                {
                    "error": {
                        "code": "generation_failed",
                        "message": f"{type(e).__name__}: {e}",
                        "type": "server_error",
                        "param": None,
                    }
                }
            )
            return
        yield chunk(None if chat else "", result.finish_reason)
        if include_usage:
            data = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": body.model}
            yield _event({**data, "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _result(future: Any) -> GenerationResult:
    try:
        return await asyncio.wrap_future(future)
    except NoChatTemplateError as e:
        raise ApiError(400, "no_chat_template", str(e)) from None


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=True)}\n\n"
