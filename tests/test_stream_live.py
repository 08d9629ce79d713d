"""End to end over real processes: a daphne web server and `manage.py worker`.

The test process, the web process and the worker share the PostgreSQL test database and
Redis (prefix of this session); clients talk to daphne over real HTTP and WebSockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings

from conversations.models import Conversation, Event, Message
from gateway.models import ApiKey
from tests.conftest import requires_postgres, requires_redis

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FINAL = ("conversation_completed", "conversation_failed")

KeyMaker = Callable[..., tuple[ApiKey, str]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def live_env(**overrides: str) -> dict[str, str]:
    """The environment of child processes: this test session's database, Redis prefix and secrets."""
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "polyagents_site.test_settings"
    env["PYTHONUNBUFFERED"] = "1"
    env["REDIS_KEY_PREFIX"] = settings.REDIS_KEY_PREFIX
    env["SECRET_KEY"] = settings.SECRET_KEY
    env["JWT_SECRET_KEY"] = settings.JWT_SECRET_KEY
    db = settings.DATABASES["default"]
    if settings.USING_POSTGRES:
        host = db.get("HOST") or "127.0.0.1"
        port = db.get("PORT") or 5432
        user = db.get("USER") or "postgres"
        env["DATABASE_URL"] = f"postgresql://{user}@{host}:{port}/{db['NAME']}"
    env["LOG_LEVEL"] = "WARNING"
    env.update(overrides)
    return env


class Process:
    """A child process with its output in a log file (read back when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.handle = log.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        self.handle.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self.handle.close()


def start_web(env: dict[str, str], log_dir: Path) -> tuple[Process, str]:
    port = free_port()
    process = Process(
        [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "polyagents_site.asgi:application"],
        env,
        log_dir / f"daphne-{port}.log",
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"daphne exited:\n{process.output()}")
        try:
            if httpx.get(f"{base}/", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"daphne did not start:\n{process.output()}")


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker") -> Process:
    return Process(
        [PYTHON, "manage.py", "worker", "--concurrency", "8"],
        env,
        log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log",
    )


@pytest.fixture
def web(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    process, base = start_web(live_env(), tmp_path)
    yield base
    process.kill()


@pytest.fixture
def worker(transactional_db: None, tmp_path: Path) -> Iterator[Process]:
    process = start_worker(live_env(), tmp_path)
    yield process
    process.kill()


async def start_stream(base: str, raw: str, body: dict[str, Any]) -> dict[str, Any]:
    conversation_id = uuid.uuid4()
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        response = await client.post(
            f"/stream/{conversation_id}", json=body, headers={"Authorization": f"Bearer {raw}"}
        )
    assert response.status_code == 202, response.text
    return dict(response.json())


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


async def collect(
    url: str, raw: str, *, stop_after: int | None = None, timeout: float = 60
) -> list[dict[str, Any]]:
    """Events received on one connection until the final event (or `stop_after` events)."""
    events: list[dict[str, Any]] = []
    async with websockets.connect(url, subprotocols=[websockets.Subprotocol(f"bearer.{raw}")]) as ws:
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=timeout))
            events.append(event)
            if event["type"] in FINAL or (stop_after is not None and len(events) >= stop_after):
                return events


async def stored_events(conversation_id: str) -> list[dict[str, Any]]:
    rows = (
        Event.objects.filter(conversation_id=conversation_id).order_by("seq").values_list("data", flat=True)
    )
    return [row async for row in rows]


@requires_redis
@requires_postgres
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
async def test_web_and_worker_processes_stream_a_conversation(
    make_key: KeyMaker, web: str, worker: Process
) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    started = await start_stream(
        web, raw, {"message": "Should cities ban cars?", "num_agents": 3, "turns": 2}
    )
    events = await collect(ws_url(web, started["websocket_url"]), raw)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "conversation_completed", worker.output()
    conversation = await Conversation.objects.aget(pk=started["conversation_id"])
    assert conversation.status in ("completed", "no_consensus")
    assert await stored_events(started["conversation_id"]) == events
    # The Redis Stream holds the same log, in order.
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(str(settings.REDIS_URL))
    entries = await client.xrange(f"{settings.REDIS_KEY_PREFIX}:stream:{started['conversation_id']}")
    await client.aclose()
    assert [json.loads(fields[b"e"])["seq"] for _, fields in entries or [] if fields] == [
        e["seq"] for e in events
    ]


@requires_redis
@requires_postgres
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
async def test_reconnecting_client_receives_every_event_exactly_once(
    make_key: KeyMaker, web: str, worker: Process
) -> None:
    _, raw = await sync_to_async(make_key)(["read", "write"])
    started = await start_stream(web, raw, {"message": "Is Pluto a planet?", "num_agents": 3, "turns": 3})
    url = ws_url(web, started["websocket_url"])
    received: list[dict[str, Any]] = []
    # Drop the connection every few events and come back with after=<last seq seen>.
    while not received or received[-1]["type"] not in FINAL:
        after = received[-1]["seq"] if received else 0
        received += await collect(f"{url}?after={after}", raw, stop_after=4)
    seqs = [e["seq"] for e in received]
    assert seqs == list(range(1, len(seqs) + 1))  # none lost, none twice
    assert await stored_events(started["conversation_id"]) == received
    answers = [e for e in received if e["type"] in ("agent_response", "agent_error")]
    messages = Message.objects.filter(conversation_id=started["conversation_id"], role="agent")
    assert await messages.acount() == len(answers) >= 3
