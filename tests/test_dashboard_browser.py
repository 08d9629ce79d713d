"""The dashboard in headless Debian Chromium (Playwright) against a live daphne server.

The server runs the embedded default (a SQLite file, in-process runs), so this test is the
same on every machine; it saves screenshots under test-artifacts/. Besides live runs on the
simulated provider, conversations are stored as event rows and replayed: one carries hostile
HTML and the fields the API is growing (clean text beside `raw_response`, `synthesis`
events, `agreement`, costs), so the page is tested against those shapes too.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.test_stream_live import PYTHON, ROOT, Process, live_env, start_web, start_worker

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
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Debian chromium not installed at {CHROMIUM}"),
]

# Stores a conversation and its events as the event log would, for the key named "browser".
STORE_SCRIPT = """
import json, sys
from django.utils import timezone
from conversations.models import Conversation, Event
from gateway.models import ApiKey
spec = json.load(sys.stdin)
key = ApiKey.objects.get(name="browser")
conversation = Conversation.objects.create(
    id=spec["id"], owner=f"key:{key.pk}", api_key=key, title=spec["title"], status=spec["status"],
    num_agents=3, turns_requested=2, turns_completed=2, exchanges=1, confidence=spec.get("confidence"),
    last_seq=len(spec["events"]), heartbeat_at=timezone.now() if spec["status"] == "running" else None,
)
Event.objects.bulk_create(
    Event(conversation=conversation, seq=n, type=event["type"],
          data={**event, "seq": n, "conversation_id": spec["id"]})
    for n, event in enumerate(spec["events"], start=1)
)
"""


@dataclass
class Server:
    base: str
    key: str
    env: dict[str, str]

    def store(
        self, title: str, status: str, events: list[dict[str, Any]], confidence: float | None = None
    ) -> str:
        conversation_id = str(uuid.uuid4())
        spec = {
            "id": conversation_id,
            "title": title,
            "status": status,
            "events": events,
            "confidence": confidence,
        }
        subprocess.run(
            [PYTHON, "manage.py", "shell", "-c", STORE_SCRIPT],
            cwd=ROOT,
            env=self.env,
            input=json.dumps(spec),
            text=True,
            check=True,
        )
        return conversation_id


def _start(tmp_path: Path, latency: str) -> Iterator[Server]:
    """A daphne server and a read/write API key for it.

    With PostgreSQL and Redis (DATABASE_URL and REDIS_URL set) the server and a procrastinate
    worker use this session's test database and Redis prefix; otherwise the server runs the
    embedded defaults on its own SQLite file.
    """
    on_services = bool(settings.USING_POSTGRES and settings.REDIS_URL)
    if on_services:
        env = live_env(SIMULATED_LATENCY=latency)
    else:
        env = live_env(DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", SIMULATED_LATENCY=latency)
        env.pop("REDIS_URL", None)
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True
        )
    created = subprocess.run(
        [PYTHON, "manage.py", "create_api_key", "--name", "browser", "--permissions", "read,write"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    raw = [line.strip() for line in created.stdout.splitlines() if line.strip()][-1]
    processes: list[Process] = []
    try:
        process, base = start_web(env, tmp_path)
        processes.append(process)
        if on_services:
            processes.append(start_worker(env, tmp_path))
        yield Server(base, raw, env)
    finally:
        for process in processes:
            process.kill()


@pytest.fixture
def server(transactional_db: None, tmp_path: Path) -> Iterator[Server]:
    yield from _start(tmp_path, "0.15")


@pytest.fixture
def slow_server(transactional_db: None, tmp_path: Path) -> Iterator[Server]:
    """Each simulated call takes 3 s: a run is still going when the test cancels it."""
    yield from _start(tmp_path, "3")


@pytest.fixture
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def use_key(page: Any, server: Server) -> None:
    page.fill("#api-key", server.key)
    page.click("#save-key")
    page.wait_for_selector("#key-form.has-key")


def wait_until_finished(page: Any) -> None:
    page.wait_for_function(
        "() => ['Finished', 'Ended'].some((w) => document.getElementById('status-line')"
        ".textContent.startsWith(w))",
        timeout=60_000,
    )


def visible_text(page: Any) -> str:
    return str(page.locator("main").inner_text())


# --- a stored conversation in the API's newer shape, with hostile Markdown ----------------------
HOSTILE = (
    "Spaces, mostly. Here is why:\n\n"
    "1. **Consistent** rendering everywhere\n"
    "2. PEP 8 says so\n\n"
    "| editor | default |\n| --- | --- |\n| vim | tabs |\n| VS Code | spaces |\n\n"
    "```python\ndef f():\n    return 4\n```\n\n"
    'An image: <img src=x onerror="window.pwned = 1"> and a '
    "[harmless-looking link](javascript:window.pwned=2), "
    '<a href="javascript:window.pwned=3">another</a>, <script>window.pwned = 4</script>'
    '<svg onload="window.pwned=5"></svg> and a [real link](https://example.com/pep8).\n\n'
    "FINAL POSITION: Spaces\nCONFIDENCE: 0.85"
)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt": prompt, "completion": completion, "total": prompt + completion}


def stored_events(question: str) -> list[dict[str, Any]]:
    agents = [
        {"agent_id": f"agent_{n}", "provider": "gemini", "model": "gemini-2.5-flash", "temperature": 0.7,
         "personality": p}
        for n, p in enumerate(["analytical", "pragmatic", "sceptical"])
    ]  # fmt: skip

    def reply(
        agent: int, turn: int, content: str, position: str, confidence: float, **extra: Any
    ) -> dict[str, Any]:
        return {
            "type": "agent_response",
            "agent_id": f"agent_{agent}",
            "turn": turn,
            "content": content,
            "position": position,
            "confidence": confidence,
            "abstained": False,
            "model": "gemini-2.5-flash",
            "provider": "gemini",
            "temperature": 0.7,
            "personality": agents[agent]["personality"],
            "latency_ms": 900.0 + 100 * agent,
            "tokens": _usage(300, 120),
            "simulated": False,
            "cost_usd": 0.00042,
            **extra,
        }

    return [
        {"type": "conversation_started", "question": question, "num_agents": 3, "turns": 2, "agents": agents},
        {"type": "turn_started", "turn": 1},
        reply(0, 1, HOSTILE, "Spaces", 0.85),
        reply(1, 1, "Tabs: one character per level.\n\nFINAL POSITION: Tabs\nCONFIDENCE: 0.6", "Tabs", 0.6),
        reply(
            2, 1, "It depends on the team.\n\n**FINAL POSITION:** Spaces\n**CONFIDENCE:** 70%", "Spaces", 0.7
        ),
        {"type": "consensus_update", "turn": 1, "consensus": "spaces", "confidence": 0.58, "share": 0.67},
        {"type": "turn_started", "turn": 2},
        reply(
            0,
            2,
            "Still spaces: *tooling* defaults to them.",
            "Spaces",
            0.9,
            raw_response="Still spaces: *tooling* defaults to them.\nFINAL POSITION: Spaces\nCONFIDENCE: 0.9",
        ),
        reply(
            1,
            2,
            "Tabs remain more accessible.",
            "Tabs",
            0.65,
            raw_response="Tabs remain more accessible.\nFINAL POSITION: Tabs\nCONFIDENCE: 0.65",
        ),
        reply(
            2,
            2,
            "I now lean to tabs for accessibility.",
            "Tabs",
            0.6,
            raw_response="I now lean to tabs for accessibility.\nFINAL POSITION: Tabs\nCONFIDENCE: 0.6",
        ),
        {"type": "consensus_update", "turn": 2, "consensus": "tabs", "confidence": 0.55, "share": 0.67},
        {
            "type": "vote",
            "voter": "agent_0",
            "choice": "A",
            "position": "Spaces",
            "confidence": 0.9,
            "reason": "Tooling.",
        },
        {
            "type": "vote",
            "voter": "agent_1",
            "choice": "B",
            "position": "Tabs",
            "confidence": 0.7,
            "reason": "Accessibility.",
        },
        {
            "type": "vote",
            "voter": "agent_2",
            "choice": None,
            "position": "",
            "confidence": 0.5,
            "reason": "[why] no VOTE line",
        },
        {
            "type": "consensus_reached",
            "consensus": "Still spaces: *tooling* defaults to them.",
            "position": "Spaces",
            "reached": True,
            "confidence": 0.81,
            "confidence_source": "history",
            "agreement": {"share": 0.33, "margin": 0.0},
            "method": "majority",
            "winner": "A",
            "tallies": {"A": 1.0, "B": 1.0},
            "tie_break": "confidence",
            "dissent": [
                {"voter": "agent_1", "choice": "B", "confidence": 0.7, "reason": "Accessibility."},
                {"voter": "agent_2", "choice": None, "confidence": 0.5, "reason": "[why] no VOTE line"},
            ],
        },
        {"type": "synthesis_delta", "delta": "**Use spaces** in shared code: editors and "},
        {"type": "synthesis_delta", "delta": "linters default to them.\n\n- Tabs help screen-reader users"},
        {
            "type": "synthesis",
            "content": "**Use spaces** in shared code: editors and linters default to them.\n\n"
            "- Tabs help screen-reader users; a formatter can convert.\n\n"
            "FINAL POSITION: Spaces\nCONFIDENCE: 0.81",
            "model": "gemini-2.5-pro",
            "tokens": _usage(900, 200),
            "latency_ms": 2100.0,
            "cost_usd": 0.0031,
        },
        {
            "type": "conversation_completed",
            "status": "completed",
            "duration": 7.4,
            "turns_completed": 2,
            "early_stop": False,
            "tokens": _usage(2900, 1100),
            "confidence": 0.81,
            "cost_usd": 0.0057,
        },
    ]


def test_ask_a_question_and_watch_the_panel_reach_consensus(server: Server, browser: Any) -> None:
    question = 'Tabs or spaces? <img src=x onerror="window.pwned=1">'
    page = browser.new_page(viewport=DESKTOP)
    page.goto(f"{server.base}/")
    assert page.title().startswith("PolyAgents")
    page.screenshot(path=str(ARTIFACTS / "dashboard-empty.png"), full_page=True)
    use_key(page, server)
    page.fill("#num-agents", "3")
    page.fill("#turns", "2")
    # Shift+Enter is a new line, Enter asks.
    page.click("#question")
    page.keyboard.type("Tabs or spaces?")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Explain briefly.")
    assert page.input_value("#question") == "Tabs or spaces?\nExplain briefly."
    assert page.locator("#final-status").inner_text() == ""  # nothing was asked yet
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_selector("#final:not([hidden])", timeout=60_000)
    wait_until_finished(page)
    assert page.locator("#final-status").inner_text() in {"Consensus", "No consensus"}

    # One column per agent; each turn shows its position as a chip and its confidence as a figure.
    columns = page.locator("#agents .agent")
    assert columns.count() == 3
    for index in range(3):
        column = columns.nth(index)
        assert column.locator(".agent-title .simulated").inner_text() == "simulated"
        assert "tokens" in column.locator(".usage-line").inner_text()
        turns = column.locator(".turn")
        assert turns.count() >= 1
        for n in range(turns.count()):
            turn = turns.nth(n)
            assert turn.locator(".turn-position .chip").inner_text().strip()
            assert turn.locator("summary .figure").inner_text().endswith("%")
        assert turns.last.get_attribute("open") is not None  # the latest turn is open
        assert column.locator(".turn .text").last.inner_text().strip()
    assert page.locator("#agents .turn.streaming").count() == 0
    # The machine lines are gone from every answer shown.
    text = visible_text(page)
    assert "FINAL POSITION" not in text
    assert "CONFIDENCE:" not in text
    # The vote as a chart, the answer, its figures and the totals.
    assert page.locator("#turn-confidence li").count() >= 1
    if page.locator("#vote-block:not([hidden])").count():
        rows = page.locator("#votes .vote-row")
        assert rows.count() >= 1
        assert page.locator("#votes .vote-row.winner").count() <= 1
        tallies = [float(t) for t in page.locator("#votes .vote-tally").all_inner_texts()]
        assert tallies == sorted(tallies, reverse=True)
    assert page.locator("#final-answer").inner_text().strip()
    assert page.locator("#final-confidence").inner_text().strip().endswith("%")
    assert page.locator("#totals [data-kind='tokens'] dd").inner_text().replace(",", "").isdigit()
    assert page.locator("#totals [data-kind='time'] dd").inner_text().endswith("s")
    assert page.locator("#totals [data-kind='est. cost']").count() == 0  # the server reports no cost yet
    # Untrusted text is shown as text, never parsed as HTML.
    assert page.locator("#question-view").inner_text() == question
    assert page.locator("#question-view img").count() == 0
    assert page.evaluate("window.pwned") is None
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # The page keeps a shareable link: opened fresh on a phone, the conversation is replayed
    # over the WebSocket (after=0) and the same panel and answer come back.
    conversation_id = page.locator("#conversation-label").inner_text()
    assert uuid.UUID(conversation_id)
    share = page.locator("#share-link").get_attribute("href")
    assert share == f"{server.base}/?c={conversation_id}"
    assert page.url == share
    final_answer = page.locator("#final-answer").inner_text()
    phone = browser.new_page(viewport=PHONE)
    phone.goto(share)
    assert "open this conversation" in phone.locator("#status-line").inner_text()  # a new tab needs the key
    use_key(phone, server)
    phone.wait_for_selector("#final:not([hidden])", timeout=30_000)
    wait_until_finished(phone)
    assert phone.locator("#final-answer").inner_text() == final_answer
    assert phone.locator("#agents .agent").count() == 3
    assert phone.locator("#question-view").inner_text() == question
    # Compact: nothing is wider than the screen.
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    phone.screenshot(path=str(ARTIFACTS / "dashboard-phone-screen.png"))

    # The older /#<id> links still open it.
    page.goto(f"{server.base}/#{conversation_id}")
    page.wait_for_selector("#final:not([hidden])", timeout=30_000)
    assert page.locator("#final-answer").inner_text() == final_answer
    assert page.url == share


def test_stored_answers_render_markdown_and_hostile_html_stays_inert(server: Server, browser: Any) -> None:
    question = "Tabs or spaces for indenting Python code in a team whose editors all differ?"
    conversation_id = server.store(
        "Tabs or spaces for indenting Python code in a team whose editors all differ, "
        "and what should the formatter enforce on every commit?",
        "completed",
        stored_events(question),
        confidence=0.81,
    )
    page = browser.new_page(viewport=DESKTOP)
    page.goto(f"{server.base}/?c={conversation_id}")
    use_key(page, server)
    page.wait_for_selector("#final:not([hidden])", timeout=30_000)
    wait_until_finished(page)

    # Markdown is rendered: lists, tables, code, emphasis, links that open elsewhere (turn 1 is
    # folded now, so its text is read with text_content()).
    first = page.locator("#agents .agent[data-agent='agent_0'] .turn[data-turn='1'] .text")
    assert first.locator("ol li").count() == 2
    assert first.locator("table tr").count() == 3
    assert first.locator("pre code").text_content().startswith("def f():")
    assert first.locator("strong").first.text_content() == "Consistent"
    real = first.locator("a[href='https://example.com/pep8']")
    assert real.get_attribute("rel") == "noopener noreferrer nofollow"
    assert real.get_attribute("target") == "_blank"
    # Hostile HTML stays inert: no image, script, SVG or handler survives, no javascript: link.
    assert (
        page.locator("#agents img, #agents script, #agents svg, #agents [onerror], #agents [onload]").count()
        == 0
    )
    assert page.locator("a[href^='javascript' i]").count() == 0
    assert first.locator("a:not([href])", has_text="harmless-looking link").get_attribute("title") == (
        "unsafe link removed"
    )
    for anchor in first.locator("a").all():
        href = anchor.get_attribute("href")
        assert href is None or href.startswith("https://")
    page.wait_for_timeout(300)  # a load error handler would have run by now
    assert page.evaluate("window.pwned") is None

    # Machine lines are hidden, positions are chips, confidences figures; clean fields are used as they are.
    assert "FINAL POSITION" not in visible_text(page)
    assert "CONFIDENCE:" not in visible_text(page)
    assert (
        page.locator("#agents .agent[data-agent='agent_2'] .turn[data-turn='1'] .figure").inner_text()
        == "70%"
    )
    turn2 = page.locator("#agents .agent[data-agent='agent_0'] .turn[data-turn='2']")
    assert turn2.locator(".turn-position .chip").inner_text() == "Spaces"
    assert turn2.locator(".text em").inner_text() == "tooling"
    assert (
        page.locator("#agents .agent[data-agent='agent_0'] .turn[data-turn='1']").get_attribute("open")
        is None
    )

    # Per agent and in total: tokens, latency and the estimated cost the events carry.
    usage = page.locator("#agents .agent[data-agent='agent_0'] .usage-line").inner_text()
    assert usage == "840 tokens · 1.8 s · $0.00084 est."
    assert "$0.00042 est." in turn2.locator(".meta").inner_text()
    assert page.locator("#totals [data-kind='tokens'] dd").inner_text() == "4,000"
    assert page.locator("#totals [data-kind='time'] dd").inner_text() == "7.4 s"
    assert page.locator("#totals [data-kind='est. cost'] dd").inner_text() == "$0.0057"

    # The vote: a bar per option with its tally, the winner, the tie-break and the dissent.
    rows = page.locator("#votes .vote-row")
    assert rows.count() == 2
    assert page.locator("#votes .vote-row.winner").get_attribute("data-option") == "A"
    assert page.locator("#votes .vote-row.winner .chip").inner_text() == "Spaces"
    assert page.locator("#votes .vote-tally").all_inner_texts() == ["1", "1"]
    notes = page.locator("#vote-notes").inner_text()
    assert "Tie broken by the ballots' confidence" in notes
    assert "agent_1 voted B" in notes
    assert "agent_2 abstained" in notes
    assert page.locator("#final-agreement").inner_text() == "33%"

    # The synthesised answer replaces the winner's text, rendered and without machine lines.
    assert page.locator("#final-answer strong").inner_text() == "Use spaces"
    assert (
        page.locator("#final-answer li").inner_text().startswith("Tabs help screen-reader users; a formatter")
    )
    assert page.locator("#final-answer.streaming").count() == 0
    assert "gemini-2.5-pro" in page.locator("#synthesis-note").inner_text()
    assert page.locator("#final-confidence").inner_text() == "81%"
    assert page.locator("#confidence-source").inner_text() == "from history"
    assert "past answers" in (page.locator("#confidence-source").get_attribute("title") or "")
    # A folded turn opens on a click.
    page.click("#agents .agent[data-agent='agent_0'] .turn[data-turn='1'] summary")
    assert first.locator("table").is_visible()
    page.screenshot(path=str(ARTIFACTS / "dashboard-markdown.png"), full_page=True)


def test_a_synthesis_still_being_written_streams_into_the_answer(server: Server, browser: Any) -> None:
    events = stored_events("Tabs or spaces?")
    cut = next(n for n, e in enumerate(events) if e["type"] == "synthesis")
    conversation_id = server.store("Tabs or spaces?", "running", events[:cut])
    page = browser.new_page(viewport=DESKTOP)
    page.goto(f"{server.base}/?c={conversation_id}")
    use_key(page, server)
    page.wait_for_selector("#final-answer.streaming li")
    answer = page.locator("#final-answer")
    assert answer.locator("strong").inner_text() == "Use spaces"
    assert answer.locator("li").inner_text() == "Tabs help screen-reader users"
    assert page.locator("#synthesis-note").inner_text() == "Writing the synthesised answer…"
    assert page.locator("#cancel-button").is_enabled()  # still running: it can be cancelled
    assert page.locator("#votes .vote-row.winner").get_attribute("data-option") == "A"
    page.screenshot(path=str(ARTIFACTS / "dashboard-synthesis-streaming.png"), full_page=True)


def test_recent_conversations_filter_truncate_and_open_with_a_link(server: Server, browser: Any) -> None:
    # 178 characters: longer than two lines of the column, shorter than the 200 a title holds.
    long_title = "Which of these three database designs " + "scales best under heavy write load " * 4
    done = server.store(long_title, "completed", stored_events("Which design scales best?"), confidence=0.81)
    failed = server.store(
        "Why did this one fail?",
        "failed",
        [
            {
                "type": "conversation_started",
                "question": "Why did this one fail?",
                "num_agents": 3,
                "turns": 2,
            },
            {
                "type": "conversation_failed",
                "status": "failed",
                "reason": "only 1 of 3 agents answered turn 1",
            },
        ],
    )
    page = browser.new_page(viewport=DESKTOP)
    page.goto(f"{server.base}/")
    use_key(page, server)
    page.wait_for_selector(f"#recent-list button[data-conversation='{failed}']")
    assert page.locator("#recent-list button").count() == 2

    # Long titles are clamped with an ellipsis, whole in the tooltip.
    title = page.locator(f"#recent-list button[data-conversation='{done}'] .title")
    assert title.evaluate("e => e.scrollHeight > e.clientHeight")
    assert (
        page.locator(f"#recent-list button[data-conversation='{done}']").get_attribute("title") == long_title
    )
    assert title.evaluate("e => e.getBoundingClientRect().height") < 50

    # The filter by status asks the server for that status only.
    page.select_option("#status-filter", "failed")
    page.wait_for_function("() => document.querySelectorAll('#recent-list button').length === 1")
    assert page.locator("#recent-list button").get_attribute("data-conversation") == failed
    page.select_option("#status-filter", "running")
    page.wait_for_function(
        "() => document.getElementById('recent-note').textContent === 'No running conversations.'"
    )
    assert page.locator("#recent-list button").count() == 0
    page.select_option("#status-filter", "")
    page.wait_for_selector(f"#recent-list button[data-conversation='{done}']")

    # Opening one replays it and gives it a link; Back returns to the previous one.
    page.click(f"#recent-list button[data-conversation='{failed}']")
    wait_until_finished(page)
    assert page.locator("#final-status").inner_text() == "Failed"
    assert "only 1 of 3 agents answered" in page.locator("#final-answer").inner_text()
    assert page.url == f"{server.base}/?c={failed}"
    page.click(f"#recent-list button[data-conversation='{done}']")
    page.wait_for_selector("#final:not([hidden])")
    wait_until_finished(page)
    assert page.url == f"{server.base}/?c={done}"
    assert (
        page.locator(f"#recent-list button[data-conversation='{done}']").get_attribute("aria-current")
        == "true"
    )
    page.screenshot(path=str(ARTIFACTS / "dashboard-recent.png"), full_page=True)
    page.go_back()
    page.wait_for_function(f"() => document.getElementById('conversation-label').textContent === '{failed}'")
    wait_until_finished(page)
    assert page.locator("#final-status").inner_text() == "Failed"

    phone = browser.new_page(viewport=PHONE)
    phone.goto(f"{server.base}/?c={done}")
    use_key(phone, server)
    wait_until_finished(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.screenshot(path=str(ARTIFACTS / "dashboard-phone-markdown.png"), full_page=True)


def test_escape_cancels_a_running_conversation(slow_server: Server, browser: Any) -> None:
    page = browser.new_page(viewport=DESKTOP)
    page.goto(f"{slow_server.base}/")
    use_key(page, slow_server)
    page.fill("#question", "Is a hot dog a sandwich?")
    page.press("#question", "Enter")
    page.wait_for_function("() => document.getElementById('status-line').textContent.startsWith('Turn 1')")
    page.keyboard.press("Escape")
    wait_until_finished(page)
    assert page.locator("#final-status").inner_text() == "Cancelled"
    assert page.locator("#status-line").inner_text().startswith("Ended: cancelled")
    assert page.locator("#cancel-button").is_disabled()
