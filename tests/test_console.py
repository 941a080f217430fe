"""The edit console (``GET /console/``) end to end in a headless browser, against a real service.

The service runs FT-M on the tiny Llama (30 steps at lr 5e-2 make the edit win the greedy answer;
FT-M only rolls back by replay, so the refused in-place rollback is exercised too). The browser is
Debian's chromium driven by Playwright (no browser download); without chromium the test is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lemoe.methods import build_method
from lemoe.service import EditService, ServiceConfig
from lemoe.store import EditStore
from lemoe.testing import tiny_model

TOKEN = "console-token-123456"
OPTIONS = {"steps": 30, "lr": 5e-2}
PROMPT, SUBJECT, TARGET = "The capital of Freedonia is", "Freedonia", "Paris"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Chromium logs every 4xx fetch as a console error; these are the refusals the test provokes on purpose.
EXPECTED_REFUSALS = re.compile(r"^Failed to load resource: the server responded with a status of (401|409) ")


@pytest.fixture
def console_url(tmp_path: Path, tokenizer: object) -> Iterator[str]:
    store = EditStore.init(
        tmp_path / "store",
        model="tiny-llama",
        method="ft-m",
        options=OPTIONS,
        edits_per_step=1,
        loaded=(tiny_model("llama"), tokenizer),
    )
    svc = EditService(
        store,
        ServiceConfig(token=TOKEN, port=0, max_new_tokens=8),
        lambda: build_method("ft-m", tiny_model("llama"), tokenizer, OPTIONS),
    )
    host, port = svc.start()
    try:
        yield f"http://{host}:{port}/console/"
    finally:
        svc.stop()
        store.close()


@pytest.fixture
def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium binary (install it with scripts/setup_browser.sh)")
    return binary


@pytest.mark.timeout(180)
def test_console_edit_ask_and_roll_back(console_url: str, chromium: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            expect.set_options(timeout=60_000)
            page.goto(console_url)

            # A wrong token is refused (401) and asked for again; the right one opens the console.
            page.locator("#token-input").fill("wrong-token-000000")
            page.get_by_role("button", name="Use token").click()
            expect(page.get_by_test_id("login-message")).to_contain_text("refused")
            page.locator("#token-input").fill(TOKEN)
            page.get_by_role("button", name="Use token").click()
            expect(page.locator('[data-field="method"]')).to_contain_text("ft-m")
            assert page.evaluate("sessionStorage.getItem('lemoe-token')") == TOKEN

            def ask() -> tuple[str, str]:
                page.get_by_role("button", name="Ask").click()
                expect(page.get_by_test_id("answers")).to_have_attribute("aria-busy", "false")
                return (
                    page.get_by_test_id("answer-edited").text_content() or "",
                    page.get_by_test_id("answer-base").text_content() or "",
                )

            page.locator("#ask-prompt").fill(PROMPT)
            page.get_by_label("New tokens").fill("6")
            edited, base = ask()
            assert edited == base and TARGET not in base and base.strip()

            # Submit one edit and watch it be applied.
            page.locator("#edit-prompt").fill(PROMPT)
            page.get_by_label("New answer").fill(TARGET)
            page.get_by_label("Subject").fill(SUBJECT)
            page.get_by_role("button", name="Submit edit").click()
            expect(page.get_by_test_id("edit-message")).to_have_text("Accepted as edit 1.")
            expect(page.locator('[data-testid="edit-row"][data-seq="1"]')).to_have_attribute("data-status", "applied")
            batch = page.locator('[data-testid="batch-row"]').first
            expect(batch).to_have_attribute("data-status", "applied")
            batch_id = batch.get_attribute("data-batch")

            edited, base = ask()
            assert TARGET in edited and TARGET not in base

            # FT-M cannot roll back in place: the 409's message is shown. By replay it can.
            rollback = page.get_by_role("button", name=f"Roll back batch {batch_id}")
            page.get_by_label("Roll back by replay").uncheck()
            rollback.click()
            expect(page.get_by_test_id("rollback-message")).to_contain_text(f"Batch {batch_id} not rolled back: ")
            page.get_by_label("Roll back by replay").check()
            rollback.click()
            expect(page.get_by_test_id("rollback-message")).to_have_text(f"Rolled back batch {batch_id}.")
            expect(batch).to_have_attribute("data-status", "rolled_back")
            expect(page.locator('[data-testid="edit-row"][data-seq="1"]')).to_have_attribute(
                "data-status", "rolled_back"
            )
            edited, base_after = ask()
            assert edited == base_after == base

            # A JSONL file: a line that does not parse is reported by number and nothing is sent;
            # a clean file is sent and its edits listed.
            good = [{"prompt": f"The capital of <i>Ruritania</i> {i} is", "target_new": "Oslo"} for i in range(2)]
            lines = [json.dumps(good[0]), "{not json", json.dumps(good[1])]
            upload = page.get_by_label("One edit request")
            upload.set_input_files(
                {"name": "bad.jsonl", "mimeType": "application/json", "buffer": "\n".join(lines).encode()}
            )
            page.get_by_role("button", name="Submit file").click()
            expect(page.get_by_test_id("upload-message")).to_contain_text("Nothing sent. line 2: ")
            lines.pop(1)
            upload.set_input_files(
                {"name": "good.jsonl", "mimeType": "application/json", "buffer": "\n".join(lines).encode()}
            )
            page.get_by_role("button", name="Submit file").click()
            expect(page.get_by_test_id("upload-message")).to_have_text(
                "Sent 2 requests from good.jsonl: 2 new, 0 already in the journal."
            )
            expect(page.get_by_test_id("edit-row")).to_have_count(3)
            expect(page.locator('[data-testid="edit-row"][data-seq="3"]')).to_have_attribute("data-status", "applied")
            # Edits are data, never markup: the prompts show as the text they are.
            assert page.locator('[data-testid="edit-row"][data-seq="2"] td').nth(3).text_content() == good[0]["prompt"]
            assert page.locator("#edits i").count() == 0

            shot = tmp_path / "console.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            page.get_by_role("button", name="Forget token").click()
            expect(page.locator("#token-input")).to_be_visible()
            assert page.evaluate("sessionStorage.getItem('lemoe-token')") is None

            unexpected = [e for e in errors if not EXPECTED_REFUSALS.match(e)]
            assert not unexpected, unexpected
        finally:
            browser.close()
