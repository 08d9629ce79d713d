"""The event log: stored first, appended to the Redis Stream, published in order; replay by seq."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis
from channels.layers import get_channel_layer
from django.conf import settings
from django.test import override_settings

from conversations.events import EventLog, group_name, read_events, stream_key
from conversations.models import Conversation, Event
from tests.conftest import requires_redis

pytestmark = pytest.mark.django_db(transaction=True)


async def new_log() -> EventLog:
    conversation = await Conversation.objects.acreate(owner="key:1", status="running", exchanges=1)
    return await EventLog.open(conversation.pk)


def count_round_trips(monkeypatch: pytest.MonkeyPatch) -> tuple[aioredis.Redis, list[str]]:
    """The event log's Redis client of this loop, and a list that grows by one per round trip of
    the event log's: a pipeline opened, or a batch's command sent alone."""
    from conversations import events

    client = events.redis_client()
    assert client is not None
    trips: list[str] = []
    make_pipeline = client.pipeline
    execute_command = client.execute_command

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        trips.append("pipeline")
        return make_pipeline(*args, **kwargs)

    async def command(*args: Any, **options: Any) -> Any:
        trips.append(str(args[0]))
        return await execute_command(*args, **options)

    monkeypatch.setattr(client, "pipeline", pipeline)
    monkeypatch.setattr(client, "execute_command", command)
    return client, trips


async def test_events_are_stored_before_they_are_published() -> None:
    log = await new_log()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name(log.conversation_id), channel)
    emitted = await log.emit("turn_started", turn=1)
    message = await asyncio.wait_for(layer.receive(channel), timeout=5)
    assert message["events"] == [emitted]
    row = await Event.objects.aget(conversation_id=log.conversation_id, seq=1)
    assert row.data == emitted
    assert set(emitted) >= {"type", "conversation_id", "seq", "timestamp", "emitted_at", "turn"}
    assert emitted["timestamp"].endswith("Z")
    conversation = await Conversation.objects.aget(pk=log.conversation_id)
    assert conversation.last_seq == 1


async def test_open_continues_after_the_last_stored_seq() -> None:
    log = await new_log()
    for turn in range(3):
        await log.emit("turn_started", turn=turn)
    reopened = await EventLog.open(log.conversation_id)
    assert (await reopened.emit("turn_completed", turn=3))["seq"] == 4


async def test_concurrent_emitters_store_and_publish_in_seq_order() -> None:
    log = await new_log()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name(log.conversation_id), channel)
    await asyncio.gather(
        *(log.emit("agent_delta", agent_id=f"agent_{n % 3}", turn=1, delta="x") for n in range(20))
    )
    received: list[int] = []
    while len(received) < 20:  # one message per stored batch
        message = await asyncio.wait_for(layer.receive(channel), timeout=5)
        received += [event["seq"] for event in message["events"]]
    assert received == list(range(1, 21))
    assert [e["seq"] for e in await read_events(log.conversation_id, 0)] == list(range(1, 21))


async def test_read_events_after_n_is_exact() -> None:
    log = await new_log()
    for n in range(6):
        await log.emit("agent_delta", agent_id="agent_0", turn=1, delta=str(n))
    assert [e["seq"] for e in await read_events(log.conversation_id, 4)] == [5, 6]
    assert await read_events(log.conversation_id, 6) == []
    assert [e["delta"] for e in await read_events(log.conversation_id, 0)] == [str(n) for n in range(6)]


@requires_redis
async def test_events_are_appended_to_a_bounded_expiring_stream() -> None:
    log = await new_log()
    for n in range(3):
        await log.emit("agent_delta", agent_id="agent_0", turn=1, delta=str(n))
    client = aioredis.Redis.from_url(str(settings.REDIS_URL))
    key = stream_key(log.conversation_id)
    entries = await client.xrange(key) or []
    ttl = await client.ttl(key)
    await client.aclose()
    assert [entry_id for entry_id, _ in entries] == [b"1-0", b"2-0", b"3-0"]
    assert [json.loads((fields or {})[b"e"])["delta"] for _, fields in entries] == ["0", "1", "2"]
    assert 0 < ttl <= settings.CONFIG.STREAM_TTL


@requires_redis
async def test_a_gap_in_the_stream_falls_back_to_the_database() -> None:
    log = await new_log()
    for n in range(5):
        await log.emit("agent_delta", agent_id="agent_0", turn=1, delta=str(n))
    client = aioredis.Redis.from_url(str(settings.REDIS_URL))
    await client.xdel(stream_key(log.conversation_id), "2-0")  # trimmed or lost
    await client.aclose()
    assert [e["seq"] for e in await read_events(log.conversation_id, 0)] == [1, 2, 3, 4, 5]


@requires_redis
async def test_events_missing_from_the_stream_tail_are_read_from_the_database() -> None:
    log = await new_log()
    for n in range(3):
        await log.emit("agent_delta", agent_id="agent_0", turn=1, delta=str(n))
    # Seq 4 stored while Redis was away: only the database has it.
    await Event.objects.acreate(
        conversation_id=log.conversation_id, seq=4, type="turn_completed", data={"seq": 4}
    )
    assert [e["seq"] for e in await read_events(log.conversation_id, 1)] == [2, 3, 4]


async def test_redis_down_the_event_is_still_stored_and_replayed(caplog: pytest.LogCaptureFixture) -> None:
    log = await new_log()
    with (
        override_settings(REDIS_URL="redis://127.0.0.1:1/0"),
        caplog.at_level(logging.WARNING, "polyagents.events"),
    ):
        emitted = await log.emit("turn_started", turn=1)
        replayed = await read_events(log.conversation_id, 0)
    assert emitted["seq"] == 1
    assert await Event.objects.filter(conversation_id=log.conversation_id, seq=1).aexists()
    assert replayed == [emitted]
    assert any("Redis Stream" in record.getMessage() for record in caplog.records)


async def test_a_buffered_log_stores_every_event_but_deltas_before_emit_returns() -> None:
    conversation = await Conversation.objects.acreate(owner="key:1")
    log = EventLog(conversation.pk, buffered=True)
    await log.emit("agent_delta", agent_id="agent_0", turn=1, delta="Hel")
    await log.emit("agent_delta", agent_id="agent_0", turn=1, delta="lo")
    # The response stands beside a stored message, so it (and the deltas before it) are stored now.
    await log.emit("agent_response", agent_id="agent_0", turn=1, content="Hello")
    rows = [(e.seq, e.type) async for e in Event.objects.filter(conversation=conversation).order_by("seq")]
    assert rows == [(1, "agent_delta"), (2, "agent_delta"), (3, "agent_response")]
    await log.emit("agent_delta", agent_id="agent_0", turn=2, delta="Bye")
    await log.flush()
    assert await Event.objects.filter(conversation=conversation).acount() == 4
    refreshed = await Conversation.objects.aget(pk=conversation.pk)
    assert refreshed.last_seq == 4


@requires_redis
async def test_with_redis_a_batch_is_appended_in_one_round_trip_and_published_through_the_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = await new_log()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name(log.conversation_id), channel)
    client, trips = count_round_trips(monkeypatch)
    emitted = await log.emit("turn_started", turn=1)
    message = await asyncio.wait_for(layer.receive(channel), timeout=5)
    # The layer's own group_send message, the batch's events with their texts; and in the stream.
    assert message["events"] == [emitted]
    assert [json.loads(text) for text in message["texts"]] == [emitted]
    assert trips == ["pipeline"]  # the stream's append: one round trip
    stored = await client.xrange(stream_key(log.conversation_id))
    assert [json.loads((fields or {})[b"e"])["seq"] for _id, fields in stored or []] == [1]


async def gated_log(monkeypatch: pytest.MonkeyPatch) -> tuple[EventLog, asyncio.Event, list[int]]:
    """A buffered log whose batches are stored only once the gate is set; the seqs stored."""
    from conversations.store import event_store

    conversation = await Conversation.objects.acreate(owner="key:1")
    gate = asyncio.Event()
    stored: list[int] = []

    async def slow_store(conversation_id: object, batch: list[dict[str, Any]], *rest: object) -> None:
        await gate.wait()
        stored.extend(e["seq"] for e in batch)

    monkeypatch.setattr(event_store(), "write_batch", slow_store)
    return EventLog(conversation.pk, buffered=True), gate, stored


async def test_a_buffered_log_does_not_wait_for_the_markers_of_a_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`turn_started` and `consensus_update` are written by the writer task: a turn's agents
    start without waiting for that write; the next awaited event still follows them in order."""
    log, gate, stored = await gated_log(monkeypatch)
    await asyncio.wait_for(log.emit("turn_started", turn=1), timeout=1)
    await asyncio.wait_for(log.emit("consensus_update", turn=1, consensus="Yes"), timeout=1)
    response = asyncio.ensure_future(log.emit("agent_response", agent_id="agent_0", turn=2, content="Hi"))
    await asyncio.sleep(0.05)
    assert not response.done()  # it stands beside a row: it waits for the store
    gate.set()
    await asyncio.wait_for(response, timeout=5)
    assert stored == [1, 2, 3]


async def test_while_nobody_watches_a_buffered_log_does_not_wait_for_a_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that knows no one follows it live goes on while its answers wait for their batch;
    they are stored in order all the same, and a flush waits for them."""
    log, gate, stored = await gated_log(monkeypatch)
    log.watched = False
    await asyncio.wait_for(log.emit("agent_response", agent_id="agent_0", turn=1, content="Hi"), timeout=1)
    await asyncio.wait_for(log.emit("turn_completed", turn=1), timeout=1)
    assert stored == []
    flushed = asyncio.ensure_future(log.flush())
    await asyncio.sleep(0.05)
    assert not flushed.done()
    gate.set()
    await asyncio.wait_for(flushed, timeout=5)
    assert stored == [1, 2]
    log.watched = True  # someone follows it now: an answer waits for its batch again
    await asyncio.wait_for(log.emit("agent_response", agent_id="agent_0", turn=2, content="Yo"), timeout=5)
    assert stored == [1, 2, 3]


@requires_redis
async def test_batches_of_several_conversations_ready_together_share_one_round_trip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conversations import events

    logs = [await new_log() for _ in range(4)]
    layer = get_channel_layer()
    channels = [await layer.new_channel() for _ in logs]
    for log, channel in zip(logs, channels, strict=True):
        await layer.group_add(group_name(log.conversation_id), channel)
    client, trips = count_round_trips(monkeypatch)
    batches = [
        [{"type": "agent_delta", "conversation_id": str(log.conversation_id), "seq": seq} for seq in (1, 2)]
        for log in logs
    ]
    sends = [asyncio.ensure_future(events._send(b, [json.dumps(e) for e in b])) for b in batches]
    await asyncio.sleep(0)  # every batch is waiting for the round now
    sends[1].cancel()  # a run cancelled while its batch waits: the round still appends it, and the others
    await asyncio.gather(*sends, return_exceptions=True)
    assert trips == ["pipeline"]
    for n, (log, channel) in enumerate(zip(logs, channels, strict=True)):
        # Each conversation's events, in order, in its own stream and to its own followers only.
        stored = await client.xrange(stream_key(log.conversation_id))
        assert [json.loads((fields or {})[b"e"])["seq"] for _id, fields in stored or []] == [1, 2]
        if n == 1:
            continue  # cancelled before it published: its followers read the stream instead
        received = (await asyncio.wait_for(layer.receive(channel), timeout=5))["events"]
        assert [(e["conversation_id"], e["seq"]) for e in received] == [
            (str(log.conversation_id), 1),
            (str(log.conversation_id), 2),
        ]


@requires_redis
async def test_a_failed_round_is_reported_for_each_of_its_conversations(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from conversations import events

    logs = [await new_log() for _ in range(3)]
    with (
        override_settings(REDIS_URL="redis://127.0.0.1:1/0"),
        caplog.at_level(logging.WARNING, "polyagents.events"),
    ):
        batches = [
            [{"type": "turn_started", "conversation_id": str(log.conversation_id), "seq": 1}] for log in logs
        ]
        await asyncio.gather(*(events._send(b, [json.dumps(e) for e in b]) for b in batches))
    warned = {
        record.conversation_id  # type: ignore[attr-defined]
        for record in caplog.records
        if "Redis Stream" in record.getMessage()
    }
    assert warned == {str(log.conversation_id) for log in logs}


@requires_redis
async def test_a_batch_sent_again_is_reported_and_its_new_events_still_go_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stream refuses ids it already holds (a batch sent a second time); the batch's other
    events are still appended, every one is published, and the refusal is logged, not raised."""
    from conversations import events

    log = await new_log()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name(log.conversation_id), channel)
    client = events.redis_client()
    assert client is not None
    key = stream_key(log.conversation_id)
    await client.xadd(key, {"e": json.dumps({"seq": 2, "held": True})}, id="2-0")
    cid = str(log.conversation_id)
    batch = [{"type": "agent_delta", "conversation_id": cid, "seq": seq} for seq in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, "polyagents.events"):
        await events._send(batch, [json.dumps(e) for e in batch])
    stored = await client.xrange(key) or []
    assert [(entry_id, json.loads((fields or {})[b"e"])) for entry_id, fields in stored] == [
        (b"2-0", {"seq": 2, "held": True}),
        (b"3-0", batch[2]),
    ]
    assert 0 < await client.ttl(key) <= settings.CONFIG.STREAM_TTL
    received = await asyncio.wait_for(layer.receive(channel), timeout=5)  # the batch: one message
    assert [e["seq"] for e in received["events"]] == [1, 2, 3]
    assert [json.loads(text) for text in received["texts"]] == batch
    warnings = [r for r in caplog.records if "Redis Stream" in r.getMessage()]
    assert len(warnings) == 1
    assert "ResponseError" in warnings[0].error  # type: ignore[attr-defined]
