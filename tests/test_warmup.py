"""Warm-up at process start: what the first request needs is built before it arrives."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.conf import settings

from agents.providers import gemini, registry
from agents.providers.gemini import GeminiProvider
from polyagents_site import warmup
from streaming.worker import FULL_COLLECTION_EVERY

pytestmark = pytest.mark.django_db(transaction=True)

STEPS = {"routes", "rest_framework", "modules", "providers", "sdk_calls", "database", "cache", "fits"}


@pytest.fixture
def skipped(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The warm-up steps logged as skipped."""
    records: list[dict[str, Any]] = []
    monkeypatch.setattr(warmup.logger, "warning", lambda message, **kw: records.append(kw["extra"]))
    registry.reset_providers()
    yield records
    registry.reset_providers()


@pytest.fixture
def gemini_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.CONFIG, "GEMINI_API_KEY", "warm-up-test-key")
    monkeypatch.setattr(settings.CONFIG, "LLM_PROVIDER", None)
    monkeypatch.setattr(settings.CONFIG, "AGENT_MODELS_CONFIG", [])


def test_the_tests_do_not_warm_up_on_import() -> None:
    assert settings.CONFIG.WARM_UP is False  # test_settings: tests import the app inside the DB guard


def test_warm_up_runs_every_step(skipped: list[dict[str, Any]], gemini_configured: None) -> None:
    timings = warmup.warm_up()
    assert set(timings) == STEPS
    assert skipped == []
    provider = registry._providers.get("gemini")
    assert isinstance(provider, GeminiProvider)  # the SDK is imported and built
    # It ran a call in memory, and captured the body of each shape a default panel sends.
    from agents.orchestrator import panel_shapes
    from agents.profiles import build_panel

    shapes = panel_shapes(build_panel(settings.CONFIG.NUM_AGENTS), settings.CONFIG.MAX_OUTPUT_TOKENS)

    async def not_again(config: object) -> dict[str, Any]:
        raise AssertionError("a shape the warm-up should have prepared")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemini, "_wire_body", not_again)
        for _, request in shapes:
            asyncio.run(provider._body(provider.as_sent(request)))
    assert "conversations.services" in sys.modules


async def test_warm_up_inside_a_running_loop_runs_every_step(
    skipped: list[dict[str, Any]], gemini_configured: None
) -> None:
    # A server that imports the application from inside its loop (uvicorn): the database step
    # must not be refused by the ORM's async guard.
    timings = warmup.warm_up()
    assert set(timings) == STEPS
    assert skipped == []


def test_a_failing_step_is_logged_and_skipped(
    skipped: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise ConnectionError("cache down")

    monkeypatch.setattr(warmup, "_cache", broken)
    timings = warmup.warm_up()
    assert set(timings) == STEPS
    assert [record["step"] for record in skipped] == ["cache"]
    assert "cache down" in skipped[0]["error"]


@pytest.fixture
def heap_restored() -> Iterator[None]:
    """Give the test process its garbage collector back as it was."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


async def test_the_loop_steps_build_this_loops_sdk_client(
    skipped: list[dict[str, Any]], gemini_configured: None, heap_restored: None
) -> None:
    timings = await warmup.awarm_up()
    assert set(timings) == {"sdk_clients", "event_store", "redis", "channel_layer", "heap"}
    assert skipped == []
    provider = registry.get_provider("gemini")
    assert isinstance(provider, GeminiProvider)
    assert asyncio.get_running_loop() in provider._clients._values
    # With Redis, the event log's client of this loop holds its connections already.
    from conversations.events import redis_client
    from loopstate import postgres as pg

    client = redis_client()
    if client is not None:
        assert len(client.connection_pool._available_connections) >= warmup.REDIS_CONNECTIONS
    # On PostgreSQL the event log's pool of this loop is open, every connection made.
    if settings.USING_POSTGRES:
        assert pg.pool_size() == pg.POOL_MAX
        await pg.close_pool()
    else:
        assert pg.pool_size() == 0
    # Last, the start-up heap is set aside from the collector, and full collections are rarer.
    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold()[2] == FULL_COLLECTION_EVERY


async def test_a_worker_process_settles_its_heap_before_its_first_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streaming import worker

    happened: list[str] = []
    monkeypatch.setattr(worker, "settle_heap", lambda: happened.append("settled"))

    async def answers() -> None:
        happened.append("database")

    async def work(unsaved: set[int], **options: object) -> None:
        happened.append("worker")

    monkeypatch.setattr(worker, "database_answers", answers)
    monkeypatch.setattr(worker, "work", work)
    await worker.serve()
    assert happened == ["settled", "database", "worker"]


async def test_scheduled_on_the_running_loop() -> None:
    ran = asyncio.Event()

    async def mark() -> None:
        ran.set()

    daphne = sys.modules.pop("daphne.server", None)  # as under uvicorn: no daphne
    try:
        assert warmup.run_on_server_loop(mark) is True
    finally:
        if daphne is not None:
            sys.modules["daphne.server"] = daphne
    await asyncio.wait_for(ran.wait(), 5)


async def test_a_running_loop_wins_over_a_reactor_that_does_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported inside a running loop (an in-process ASGI client) while daphne's reactor loop
    is made but idle: a task on the running loop, not daphne's loop (which cannot run in a
    thread whose loop runs)."""
    ran = asyncio.Event()

    async def mark() -> None:
        ran.set()

    idle = asyncio.new_event_loop()
    try:
        monkeypatch.setitem(sys.modules, "daphne.server", SimpleNamespace(twisted_loop=idle))
        assert warmup.run_on_server_loop(mark) is True
        await asyncio.wait_for(ran.wait(), 5)
    finally:
        idle.close()


def test_run_to_its_end_on_daphnes_loop_before_the_reactor_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[asyncio.AbstractEventLoop] = []

    async def mark() -> None:
        ran.append(asyncio.get_running_loop())

    reactor_loop = asyncio.new_event_loop()
    try:
        monkeypatch.setitem(sys.modules, "daphne.server", SimpleNamespace(twisted_loop=reactor_loop))
        assert warmup.run_on_server_loop(mark) is True
        assert ran == [reactor_loop]  # done already: before daphne listens
    finally:
        reactor_loop.close()


def test_not_scheduled_without_a_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "daphne.server", raising=False)

    async def never() -> None:
        raise AssertionError("must not run")

    assert warmup.run_on_server_loop(never) is False


@pytest.mark.slow
def test_daphne_warms_the_event_loop_before_it_listens(tmp_path: Path) -> None:
    """The first request never waits behind the event loop's warm-up: daphne listens after it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")
        },
        "DEBUG": "true",
        "WARM_UP": "true",
        "LOG_LEVEL": "INFO",
        "DATABASE_URL": f"sqlite:///{tmp_path}/warm.sqlite3",
    }
    command = [sys.executable, "-m", "daphne", "-v", "1", "-b", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "daphne.log"
    with log.open("wb") as out:
        daphne = subprocess.Popen(
            [*command, "polyagents_site.asgi:application"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 60
            while "Listening on TCP address" not in log.read_text():
                assert daphne.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        finally:
            daphne.terminate()
            daphne.wait(timeout=10)
    text = log.read_text()
    assert '"message": "warmed up the event loop"' in text
    assert text.index('"message": "warmed up the event loop"') < text.index("Listening on TCP address")
