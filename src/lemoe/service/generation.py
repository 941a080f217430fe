"""Generation for the service: concurrent requests share one padded forward pass per step.

Every request (``/v1/generate``, the OpenAI-compatible completions, the console's side-by-side
question) becomes a :class:`GenerationJob`. One thread takes every job waiting in the queue, groups
them by model (the edited model or the unedited one), and decodes each group as one left-padded
batch with a KV cache (:func:`lemoe.evaluation.scorers.greedy_generate`). Each job follows its own
tokens through ``on_step``: it stops at its own stop tokens, stop strings or length, and a streaming
job hands each new piece of text to its client as soon as the token is decoded.

Tokenising happens on that thread too, with the replica's own tokenizer (a fast tokenizer is not
safe to share between threads), so a job carries text or chat messages, never token ids.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lemoe.evaluation.scorers import greedy_generate
from lemoe.methods.base import EditMethod

MODELS = ("edited", "base")


class NoChatTemplateError(ValueError):
    """The model's tokenizer has no chat template, so chat messages cannot be turned into a prompt."""


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (EOS, a stop token or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    state_version: int
    seconds: float


@dataclass
class GenerationJob:
    """One request. ``prompt`` is text (tokenised with the tokenizer's special tokens, as
    ``/v1/generate`` always did) or, with ``chat=True``, a list of ``{"role", "content"}`` messages
    put through the tokenizer's chat template. ``on_text`` (streaming) receives each new piece."""

    prompt: str | list[dict[str, str]]
    max_new_tokens: int
    chat: bool = False
    model: str = "edited"
    stop_strings: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None
    future: Future[GenerationResult] = field(default_factory=Future)
    # filled in by the generation thread
    tokens: list[int] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    text: str = ""
    sent: int = 0  # characters of ``text`` already handed to ``on_text``
    finish_reason: str | None = None
    prompt_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


class Source(Protocol):
    """Something that decodes a batch with one model: the serving replicas or the unedited model."""

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        limits: Sequence[int],
        on_step: Callable[[list[int], list[int]], Sequence[bool]],
    ) -> int: ...

    def tokenizer(self) -> Any: ...


def decode_batch(method: EditMethod, prompt_ids: Sequence[Sequence[int]], limits: Sequence[int], on_step: Any) -> None:
    """Greedy decoding of one batch with ``method``'s model and forward context (edits active)."""
    with torch.no_grad():
        greedy_generate(
            method.model,
            method.tokenizer,
            prompt_ids,
            limits,
            batch_size=len(prompt_ids),
            context=method.forward_context,
            on_step=on_step,
        )


class UneditedModel:
    """The model as it was before any edit, for side-by-side answers: a replica built by the service's
    factory and never given a state. Built on first use (for adaptor methods it shares the base
    weights; methods that edit weights load a copy of their own)."""

    def __init__(self, make_method: Callable[[], EditMethod]) -> None:
        self._make = make_method
        self._method: EditMethod | None = None
        self._lock = threading.Lock()

    def _get(self) -> EditMethod:
        if self._method is None:
            self._method = self._make()
        return self._method

    def tokenizer(self) -> Any:
        with self._lock:
            return self._get().tokenizer

    def generate_ids(self, prompt_ids: Any, limits: Any, on_step: Any) -> int:
        with self._lock:
            decode_batch(self._get(), prompt_ids, limits, on_step)
        return 0


def prompt_ids(tokenizer: Any, job: GenerationJob) -> list[int]:
    if not job.chat:
        return list(tokenizer(job.prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError("this model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(job.prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, chat: bool) -> frozenset[int]:
    """A completion ends at EOS; a chat reply also at any special token (the end-of-turn marker)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = {int(eos)} if eos is not None else set()
    if chat:
        ids |= {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    return frozenset(ids)


def _advance(job: GenerationJob, token: int, tokenizer: Any) -> bool:
    """Take one new token into ``job``; True when the job is finished."""
    if job.finish_reason is not None:
        return True
    if token in job.stop_ids:
        job.finish_reason = "stop"
    else:
        job.tokens.append(token)
        job.text = tokenizer.decode(job.tokens, skip_special_tokens=True)
        cut = min((i for i in (job.text.find(s) for s in job.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            job.text, job.finish_reason = job.text[:cut], "stop"
        elif len(job.tokens) >= job.max_new_tokens:
            job.finish_reason = "length"
    if job.on_text is not None:
        _stream(job)
    return job.finish_reason is not None


def _stream(job: GenerationJob) -> None:
    """Hand ``on_text`` what is certain: not a half-decoded character, not what may begin a stop string."""
    ready = len(job.text)
    if job.finish_reason is None:
        if job.text.endswith("\ufffd"):  # a multi-byte character split over tokens
            ready = len(job.text.rstrip("\ufffd"))
        hold = max((len(s) - 1 for s in job.stop_strings), default=0)
        ready = max(job.sent, ready - hold)
    if ready > job.sent:
        piece, job.sent = job.text[job.sent : ready], ready
        job.on_text(piece)  # type: ignore[misc]


class GenerationBatcher:
    """One thread that serves every queued job, one padded batch per model."""

    def __init__(self, sources: dict[str, Source], max_batch: int = 16, observe: Callable[[float], None] | None = None):
        self.sources = sources
        self.max_batch = max_batch
        self._observe = observe  # seconds per finished job (the service's latency histogram)
        self._queue: queue.Queue[GenerationJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="lemoe-generate", daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        if job.model not in self.sources:
            raise ValueError(f"model must be one of {', '.join(self.sources)}")
        self._queue.put(job)
        return job.future

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            for model in MODELS:
                group = [j for j in batch if j.model == model]
                if group:
                    self._run(self.sources[model], group)
            if stop:
                return

    def _run(self, source: Source, jobs: list[GenerationJob]) -> None:
        try:
            tokenizer = source.tokenizer()
            ready: list[GenerationJob] = []
            ids: list[list[int]] = []
            for job in jobs:
                try:
                    ids.append(prompt_ids(tokenizer, job))
                except Exception as e:  # this job's prompt only: the others still run
                    job.future.set_exception(e)
                    continue
                job.stop_ids = stop_token_ids(tokenizer, job.chat)
                job.prompt_tokens = len(ids[-1])
                ready.append(job)
            if not ready:
                return

            def on_step(rows: list[int], tokens: list[int]) -> list[bool]:
                return [_advance(ready[r], t, tokenizer) for r, t in zip(rows, tokens, strict=True)]

            version = source.generate_ids(ids, [j.max_new_tokens for j in ready], on_step)
        except Exception as e:  # answer every waiting client, never leave one hanging
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job in ready:
            job.finish_reason = job.finish_reason or "length"
            if job.on_text is not None:
                _stream(job)
            seconds = time.perf_counter() - job.started
            if self._observe is not None:
                self._observe(seconds)
            job.future.set_result(
                GenerationResult(job.text, job.finish_reason, job.prompt_tokens, len(job.tokens), version, seconds)
            )
