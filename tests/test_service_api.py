"""The service's standard faces: the OpenAPI schema, the OpenAI-compatible endpoints (driven by the
official ``openai`` client), Prometheus metrics, and TLS with a certificate made in the test.

The service runs FT-M on the tiny Llama with options that make one edit win the greedy answer, so
``edited`` and ``base`` answers differ where they should.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from lemoe.evaluation.scorers import greedy_generate
from lemoe.methods import build_method
from lemoe.service import EditService, ServiceConfig, wait_until_idle
from lemoe.store import EditStore
from lemoe.testing import tiny_model

TOKEN = "api-token-1234567"
OPTIONS = {"steps": 30, "lr": 5e-2}
PROMPT, SUBJECT, TARGET = "The capital of Freedonia is", "Freedonia", "Paris"


def _service(root: Path, tokenizer: Any, **config: Any) -> EditService:
    store = EditStore.init(
        root,
        model="tiny-llama",
        method="ft-m",
        options=OPTIONS,
        edits_per_step=1,
        loaded=(tiny_model("llama"), tokenizer),
    )
    return EditService(
        store,
        ServiceConfig(token=TOKEN, port=0, max_new_tokens=8, **config),
        lambda: build_method("ft-m", tiny_model("llama"), tokenizer, OPTIONS),
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Iterator[tuple[EditService, str]]:
    svc = _service(tmp_path_factory.mktemp("api") / "store", tokenizer)
    host, port = svc.start()
    try:
        yield svc, f"http://{host}:{port}"
    finally:
        svc.stop()
        svc.store.close()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", headers=_auth(), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _greedy_text(svc: EditService, model: Any, ids: list[int], n: int) -> str:
    tok = svc.store.method.tokenizer
    return tok.decode(greedy_generate(model, tok, [ids], [n])[0], skip_special_tokens=True)


def test_openapi_schema_and_docs_are_served_without_a_token(served: tuple[EditService, str]) -> None:
    _, url = served
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    paths = schema["paths"]
    for path, verb in [
        ("/v1/edits", "post"),
        ("/v1/edits", "get"),
        ("/v1/edits/{seq}", "get"),
        ("/v1/rollback", "post"),
        ("/v1/generate", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/models", "get"),
    ]:
        assert verb in paths[path], (path, verb)
    components = schema["components"]["schemas"]
    for model in ("SubmitIn", "EditRequestIn", "RollbackIn", "GenerateIn", "ChatCompletionIn", "CompletionIn"):
        assert model in components, model
    # every request body is documented by its model, not as an untyped blob
    ref = paths["/v1/edits"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "SubmitIn" in str(ref)
    assert "prompt" in components["EditRequestIn"]["properties"]
    docs = httpx.get(f"{url}/docs", timeout=30)
    assert docs.status_code == 200 and "openapi.json" in docs.text


def test_openai_client_chat_and_completions_edited_and_base(served: tuple[EditService, str]) -> None:
    from openai import NotFoundError, OpenAI, UnprocessableEntityError

    svc, url = served
    client = OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list()) == ["base", "edited"]

    before = _metrics(url)
    accepted = httpx.post(
        f"{url}/v1/edits",
        json={"prompt": PROMPT, "subject": SUBJECT, "target_new": TARGET},
        headers=_auth(),
        timeout=30,
    )
    assert accepted.status_code == 202
    assert wait_until_idle(svc, 120)

    # Completions: the edited model gives the new answer, the base model keeps the old one.
    edited = client.completions.create(model="edited", prompt=PROMPT, max_tokens=6)
    base = client.completions.create(model="base", prompt=PROMPT, max_tokens=6)
    assert TARGET in edited.choices[0].text and TARGET not in base.choices[0].text
    assert edited.usage is not None and edited.usage.completion_tokens <= 6
    assert edited.usage.prompt_tokens == len(svc.store.method.tokenizer(PROMPT)["input_ids"])
    # ... and each is exactly greedy decoding of its model (the store's name also means "edited")
    ids = svc.store.method.tokenizer(PROMPT)["input_ids"]
    assert edited.choices[0].text == _greedy_text(svc, svc.store.method.model, ids, 6)
    assert client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6).choices[0].text == (
        edited.choices[0].text
    )

    # Streaming gives the same text, piece by piece, and the usage when asked.
    for model, whole in (("edited", edited), ("base", base)):
        pieces, usage = [], None
        for chunk in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=6, stream=True, stream_options={"include_usage": True}
        ):
            pieces += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == whole.choices[0].text
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens

    # Chat: through the tokenizer's chat template; streamed deltas add up to the whole answer.
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    for model in ("edited", "base"):
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        answer = chat.choices[0].message
        assert answer.role == "assistant" and isinstance(answer.content, str)
        assert chat.choices[0].finish_reason in ("stop", "length")
        deltas = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True)
            if c.choices
        ]
        assert "".join(deltas) == answer.content
    tok = svc.store.method.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(text, add_special_tokens=False)["input_ids"]
    specials = torch.tensor(sorted(set(tok.all_special_ids)))
    base_chat = client.chat.completions.create(model="base", messages=messages, max_tokens=8)
    expected = greedy_generate(tiny_model("llama"), tok, [chat_ids], [8], stop_ids=specials)[0]
    assert base_chat.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)

    # A stop string ends the answer before it.
    cut = client.completions.create(model="edited", prompt=PROMPT, max_tokens=6, stop=[TARGET])
    assert TARGET not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"

    # Bad bodies get OpenAI's error shape, which the client turns into its own exceptions.
    with pytest.raises(UnprocessableEntityError) as bad:
        client.completions.create(model="edited", prompt=PROMPT, max_tokens=6, temperature=0.7)
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["param"] == "temperature"
    with pytest.raises(UnprocessableEntityError):
        client.completions.create(model="edited", prompt=PROMPT, max_tokens=10**6)
    with pytest.raises(NotFoundError) as missing:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    wrong = OpenAI(base_url=f"{url}/v1", api_key="wrong-token-000", max_retries=0)
    with pytest.raises(Exception) as denied:
        wrong.models.list()
    assert getattr(denied.value, "status_code", None) == 401

    # Metrics moved: one edit accepted and applied, one batch timed, every generation timed.
    after = _metrics(url)
    assert after["lemoe_edits_accepted_total"] - before.get("lemoe_edits_accepted_total", 0) == 1
    assert after["lemoe_edits_applied_total"] - before.get("lemoe_edits_applied_total", 0) == 1
    assert after["lemoe_batch_apply_seconds_count"] - before.get("lemoe_batch_apply_seconds_count", 0) == 1
    assert after["lemoe_generation_seconds_count"] - before.get("lemoe_generation_seconds_count", 0) >= 10
    assert after["lemoe_journal_edits{status=applied}"] >= 1
    assert after["lemoe_edit_queue_depth"] == 0 and after["lemoe_generation_queue_depth"] == 0
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401


def test_concurrent_requests_share_batches_and_match_one_at_a_time(served: tuple[EditService, str]) -> None:
    """Sixteen clients at once get exactly what each gets alone (batching changes no answer)."""
    import asyncio

    _, url = served
    prompts = [f"{PROMPT[:-3]} {i} is" for i in range(16)]

    async def ask(client: httpx.AsyncClient, prompt: str) -> str:
        body = {"model": "base", "prompt": prompt, "max_tokens": 5}
        r = await client.post(f"{url}/v1/completions", json=body, headers=_auth())
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(*(ask(client, p) for p in prompts)))

    async def alone() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return [await ask(client, p) for p in prompts]

    assert asyncio.run(together()) == asyncio.run(alone())


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    make = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    names = ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(
        [*make, *names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary to make a certificate")
def test_tls_with_a_self_signed_certificate(tmp_path: Path, tokenizer: Any) -> None:
    cert, key = _self_signed(tmp_path)
    svc = _service(tmp_path / "store", tokenizer, ssl_certfile=str(cert), ssl_keyfile=str(key))
    host, port = svc.start()
    try:
        assert svc.scheme == "https"
        trusted = ssl.create_default_context(cafile=str(cert))
        r = httpx.get(f"https://{host}:{port}/v1/store", headers=_auth(), verify=trusted, timeout=30)
        assert r.status_code == 200 and r.json()["method"] == "ft-m"
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is not trusted by default
            httpx.get(f"https://{host}:{port}/v1/health", timeout=30)
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no answer
            httpx.get(f"http://{host}:{port}/v1/health", timeout=30)
    finally:
        svc.stop()
        svc.store.close()


def test_serve_cli_refuses_half_a_tls_pair_before_opening_the_store(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not used")
    out = subprocess.run(
        [sys.executable, "-m", "lemoe", "serve", str(tmp_path / "no-store"), "--ssl-certfile", str(cert)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--ssl-certfile and --ssl-keyfile go together" in out.stderr
    assert not (tmp_path / "no-store").exists()
