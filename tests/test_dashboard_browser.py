"""The dashboard in headless Debian Chromium (Playwright) against a live daphne server.

The server runs the embedded default (a SQLite file, in-process runs), so this test is the
same on every machine; it saves screenshots under test-artifacts/.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_stream_live import PYTHON, ROOT, Process, live_env, start_web

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Debian chromium not installed at {CHROMIUM}"),
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A daphne server on its own SQLite database, and a read/write API key for it."""
    env = live_env(
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", REDIS_URL="", SIMULATED_LATENCY="0.15"
    )
    env.pop("REDIS_URL")
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    created = subprocess.run(
        [PYTHON, "manage.py", "create_api_key", "--name", "browser", "--permissions", "read,write"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    raw = [line.strip() for line in created.stdout.splitlines() if line.strip()][-1]
    process: Process
    process, base = start_web(env, tmp_path)
    yield base, raw
    process.kill()


def test_ask_a_question_and_watch_the_panel_reach_consensus(server: tuple[str, str]) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    base, raw = server
    question = 'Tabs or spaces? <img src=x onerror="window.pwned=1">'
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/")
            assert page.title().startswith("PolyAgents")
            page.fill("#api-key", raw)
            page.click("#save-key")
            page.fill("#question", question)
            page.fill("#num-agents", "3")
            page.fill("#turns", "2")
            page.click("#ask-button")
            page.wait_for_selector("#final:not([hidden])", timeout=60_000)
            page.wait_for_function(
                "document.getElementById('status-line').textContent.startsWith('Finished')", timeout=60_000
            )
            # One column per agent, each with at least one finished turn.
            columns = page.locator("#agents .agent")
            assert columns.count() == 3
            for index in range(3):
                column = columns.nth(index)
                assert column.locator(".turn .text").first.inner_text().strip()
            assert page.locator("#agents .turn.streaming").count() == 0
            assert page.locator("#turn-confidence li").count() >= 1
            assert page.locator("#votes li").count() == 3
            assert page.locator("#final-answer").inner_text().strip()
            assert page.locator("#final-confidence").inner_text().strip().endswith("%")
            # Untrusted text is shown as text, never parsed as HTML.
            assert page.locator("#question-view").inner_text() == question
            assert page.locator("#question-view img").count() == 0
            assert page.evaluate("window.pwned") is None
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # Reopen it from scratch (the page keeps the id in its URL): replayed over the
            # WebSocket with after=0, the same panel and answer come back, on a phone-sized screen.
            conversation_id = page.locator("#conversation-label").inner_text().split()[-1]
            final_answer = page.locator("#final-answer").inner_text()
            assert page.url.endswith(f"#{conversation_id}")
            page.set_viewport_size({"width": 390, "height": 844})
            page.reload()
            page.wait_for_selector("#final:not([hidden])", timeout=30_000)
            assert page.locator("#final-answer").inner_text() == final_answer
            assert page.locator("#agents .agent").count() == 3
            assert page.locator("#question-view").inner_text() == question
            recent = page.locator(f"#recent-list button[data-conversation='{conversation_id}']")
            if recent.count():  # GET /conversations/recent is served by the history feature
                recent.first.click()
                page.wait_for_selector("#final:not([hidden])", timeout=30_000)
                assert page.locator("#final-answer").inner_text() == final_answer
            page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
        finally:
            browser.close()
