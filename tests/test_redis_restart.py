"""Redis killed and started again (no persistence) under the event log and the WebSocket path.

A private redis-server this test owns stands in for the deployment's Redis. After the
restart, the first command on a pooled connection meets a socket the server has closed:
the clients reconnect and send it again (redis-py's `retry` on `ConnectionError`), so no
caller sees the restart once Redis is back. While Redis is away, replay reads the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from pytest_django.fixtures import SettingsWrapper

from conversations.events import EventLog, read_events, redis_client, stream_key
from conversations.models import Conversation
from conversations.redis_options import reconnecting
from polyagents_site.asgi import application
from streaming.consumers import CLOSE_TRY_AGAIN
from tests.conftest import requires_postgres
from tests.redis_server import RedisServer
from tests.test_recovery import Rows, prepare, wait_for
from tests.test_stream_live import (
    FINAL,
    ROOT,
    KeyMaker,
    free_port,
    live_env,
    start_stream,
    start_web,
    start_worker,
    ws_url,
)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(host="127.0.0.1", port=free_port(), log=tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.django_db(transaction=True)
async def test_event_log_and_replay_ride_through_a_redis_restart(
    private_redis: RedisServer, settings: SettingsWrapper, caplog: pytest.LogCaptureFixture
) -> None:
    settings.REDIS_URL = private_redis.url
    conversation = await Conversation.objects.acreate(owner="key:1", status="running", exchanges=1)
    log = await EventLog.open(conversation.pk)
    emitted = [await log.emit("turn_started", turn=turn) for turn in (1, 2)]
    assert await stream_seqs(conversation.pk) == [1, 2]  # the stream serves replay
    assert await read_events(conversation.pk) == emitted

    # Restarted while the log and replay were idle: the first command on the pooled connection,
    # which the server closed, reconnects and succeeds.
    await asyncio.to_thread(private_redis.restart)
    with caplog.at_level(logging.WARNING, logger="polyagents.events"):
        assert await stream_seqs(conversation.pk) == []  # no persistence
        emitted.append(await log.emit("turn_started", turn=3))
        assert await read_events(conversation.pk) == emitted
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

    # Away: events are still stored, and replay reads the database at once (a refused
    # connection, not a timeout).
    await asyncio.to_thread(private_redis.kill)
    began = time.monotonic()
    emitted.append(await log.emit("turn_started", turn=4))
    assert await read_events(conversation.pk) == emitted
    assert time.monotonic() - began < 3
    assert "Redis Stream unreadable" in caplog.text
    await asyncio.to_thread(private_redis.start)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polyagents.events"):
        emitted.append(await log.emit("turn_started", turn=5))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert await stream_seqs(conversation.pk) == [5]  # started empty again


async def stream_seqs(conversation_id: uuid.UUID) -> list[int]:
    """The seqs the conversation's Redis Stream holds, read with the event log's own client."""
    client = redis_client()
    assert client is not None
    entries = await client.xrange(stream_key(conversation_id))
    return [json.loads(fields[b"e"])["seq"] for _, fields in entries or [] if fields]


@pytest.mark.django_db(transaction=True)
async def test_a_socket_that_cannot_join_its_group_is_closed_for_the_client_to_reconnect(
    private_redis: RedisServer, settings: SettingsWrapper, make_key: KeyMaker
) -> None:
    """The issue's sequence: the layer's pub/sub connection idle while Redis dies, then a socket."""
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "streaming.layers.LocalFanoutPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": private_redis.url, **reconnecting()}], "prefix": "restart"},
        }
    }
    row, raw = await sync_to_async(make_key)(["read"])
    conversation = await Conversation.objects.acreate(owner=f"key:{row.pk}", status="completed", exchanges=1)
    log = await EventLog.open(conversation.pk)
    emitted = [await log.emit("turn_started", turn=turn) for turn in (1, 2)]

    async def follow() -> WebsocketCommunicator:
        comm = WebsocketCommunicator(application, f"/ws/{conversation.pk}?token={raw}")
        assert (await comm.connect(timeout=10))[0]
        return comm

    first = await follow()
    assert [await first.receive_json_from(timeout=5) for _ in emitted] == emitted
    await first.disconnect()  # the layer's connection stays open, idle, subscribed to nothing

    await asyncio.to_thread(private_redis.kill)
    refused = await follow()
    assert await refused.receive_output(timeout=10) == {"type": "websocket.close", "code": CLOSE_TRY_AGAIN}
    await refused.wait()
    assert CLOSE_TRY_AGAIN not in dashboard_final_close_codes()  # so the dashboard reconnects

    await asyncio.to_thread(private_redis.start)
    again = await follow()  # what the dashboard's reconnect does
    assert [await again.receive_json_from(timeout=5) for _ in emitted] == emitted
    await again.disconnect()


def dashboard_final_close_codes() -> set[int]:
    """The close codes after which static/dashboard.js does not reconnect."""
    script = (ROOT / "static" / "dashboard.js").read_text()
    handler = script[script.index("socket.onclose") :]
    handler = handler[: handler.index("state.retries += 1")]
    return {int(code) for code in re.findall(r"close\.code === (\d+)", handler)}


class Follower:
    """A WebSocket client that behaves like the dashboard: on a close other than 4401/4403/4404
    (or a refused handshake) it reconnects with after=<last seq shown>, a bounded number of times."""

    def __init__(self, url: str, raw: str) -> None:
        self.url = url
        self.raw = raw
        self.events: list[dict[str, Any]] = []
        self.closes: list[tuple[float, int | None]] = []
        self.received_at: list[float] = []

    async def run(self, *, attempts: int = 8, timeout: float = 90) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        for _ in range(attempts):
            after = self.events[-1]["seq"] if self.events else 0
            code = await self._once(f"{self.url}?after={after}", deadline)
            if self.events and self.events[-1]["type"] in FINAL:
                return self.events
            self.closes.append((time.monotonic(), code))
            assert code not in dashboard_final_close_codes(), f"closed for good with {code}"
            await asyncio.sleep(0.3)
        raise AssertionError(f"no final event after {attempts} connections; closes {self.closes}")

    async def _once(self, url: str, deadline: float) -> int | None:
        protocols = [websockets.Subprotocol(f"bearer.{self.raw}")]
        try:
            async with websockets.connect(url, subprotocols=protocols, open_timeout=10) as ws:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AssertionError(f"timed out; {len(self.events)} events, closes {self.closes}")
                    event = json.loads(await asyncio.wait_for(ws.recv(), timeout=left))
                    self.events.append(event)
                    self.received_at.append(time.monotonic())
                    if event["type"] in FINAL:
                        return None
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        except (websockets.InvalidStatus, OSError):
            return None  # refused at the handshake: the dashboard retries too


def exactly_once_in_order(events: list[dict[str, Any]], stored: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events == stored


@requires_postgres
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_websockets_across_a_redis_restart(private_redis: RedisServer, tmp_path: Path) -> None:
    """A web process and a worker on a Redis that is killed and started again mid-run."""
    env = live_env(REDIS_URL=private_redis.url, SIMULATED_LATENCY="0.4")
    raw = await asyncio.to_thread(prepare, env)
    rows = Rows(url=env["DATABASE_URL"])
    web, base = await asyncio.to_thread(start_web, env, tmp_path)
    worker = start_worker(env, tmp_path)
    try:
        # A run followed to its end: the web process's pub/sub connection is in use, then idle.
        first = await start_stream(base, raw, {"message": "Tea or coffee?", "num_agents": 2, "turns": 1})
        done = await Follower(ws_url(base, first["websocket_url"]), raw).run()
        exactly_once_in_order(done, rows.events(first["conversation_id"]))

        # Restarted while no socket of the web process is connected: the next one replays the
        # finished run on its first try, and a run started now streams live.
        await asyncio.to_thread(private_redis.restart)
        back = time.monotonic()
        after = Follower(ws_url(base, first["websocket_url"]), raw)
        replayed = await after.run(attempts=1, timeout=30)
        exactly_once_in_order(replayed, rows.events(first["conversation_id"]))
        first_event = after.received_at[0] - back
        second = await start_stream(base, raw, {"message": "Is Pluto a planet?", "num_agents": 2, "turns": 1})
        live = await Follower(ws_url(base, second["websocket_url"]), raw).run(attempts=1)
        exactly_once_in_order(live, rows.events(second["conversation_id"]))

        # Restarted under a socket following a run in flight: it gets every event once, live
        # again or by reconnecting as the dashboard does.
        long = await start_stream(base, raw, {"message": "Cats or dogs?", "num_agents": 3, "turns": 4})
        through = Follower(ws_url(base, long["websocket_url"]), raw)
        following = asyncio.ensure_future(through.run(timeout=150))
        await wait_for(lambda: len(through.events) >= 3, 60, "the first events of the long run")
        await asyncio.to_thread(private_redis.restart, 1.0)
        events = await following
        exactly_once_in_order(events, rows.events(long["conversation_id"]))
        print(
            f"\nRedis restart: a new socket's first event {first_event:.2f}s after Redis was back;"
            f" a socket connected through a 1 s outage closed {len(through.closes)} time(s)"
            f" {[code for _, code in through.closes]}"
        )
        assert first_event < 1.0 + 2.0  # a second, plus room for a machine shared by many runs
    finally:
        worker.kill()
        web.kill()
    # No consumer raised (a failed SUBSCRIBE inside `connect` did, closing its socket with 1011).
    log = web.log.read_text(errors="replace")
    assert "Exception inside application" not in log, log[-4000:]
