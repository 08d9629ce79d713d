"""A /chat run streams from the provider only while someone watches; a /stream run always does."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from unittest import mock

import pytest
from channels.layers import get_channel_layer

from conversations import events
from conversations.events import EventLog, group_name, has_watchers
from conversations.models import Event
from conversations.services import conversation_run, conversation_start
from gateway.principal import Principal

pytestmark = pytest.mark.django_db(transaction=True)


async def watched_eventually(conversation_id: uuid.UUID | str, expected: bool) -> bool:
    """has_watchers, asked until it says `expected` (a SUBSCRIBE reaches Redis asynchronously)."""
    for _ in range(100):
        if await has_watchers(conversation_id) == expected:
            return expected
        await asyncio.sleep(0.01)
    return not expected


async def test_has_watchers_follows_the_group_membership() -> None:
    layer = get_channel_layer()
    conversation_id = uuid.uuid4()
    assert await has_watchers(conversation_id) is False
    channel = await layer.new_channel()
    await layer.group_add(group_name(conversation_id), channel)
    assert await watched_eventually(conversation_id, True) is True
    assert await has_watchers(uuid.uuid4()) is False  # another conversation is not watched
    await layer.group_discard(group_name(conversation_id), channel)
    assert await watched_eventually(conversation_id, False) is False


async def run(
    *, watcher: bool, stream_when_watched: bool, batches: list[list[str]] | None = None
) -> list[str]:
    """A panel's run (2 agents, 1 turn); the types of its stored events in order. `batches`
    gets the types of each batch the event log sent."""
    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
    conversation, exchange = await conversation_start(
        principal=principal, message="Red or blue for the logo?", num_agents=2, turns=1
    )
    layer = get_channel_layer()
    channel = await layer.new_channel()
    if watcher:
        await layer.group_add(group_name(conversation.pk), channel)
        assert await watched_eventually(conversation.pk, True) is True
    send = events._send

    async def sent(batch: list[dict[str, Any]], texts: list[str]) -> None:
        if batches is not None:
            batches.append([event["type"] for event in batch])
        await send(batch, texts)

    try:
        with mock.patch.object(events, "_send", sent):
            done = await conversation_run(
                conversation_id=conversation.pk, exchange=exchange, stream_when_watched=stream_when_watched
            )
    finally:
        if watcher:
            await layer.group_discard(group_name(conversation.pk), channel)
    assert done.status in ("completed", "no_consensus")
    return [t async for t in Event.objects.filter(conversation=conversation).values_list("type", flat=True)]


async def test_an_unwatched_chat_run_makes_non_streaming_calls() -> None:
    types = await run(watcher=False, stream_when_watched=True)
    assert "agent_delta" not in types
    assert types.count("agent_response") == 2  # the answers are all there


async def test_a_watched_chat_run_streams() -> None:
    types = await run(watcher=True, stream_when_watched=True)
    assert "agent_delta" in types
    assert types.index("agent_delta") < types.index("agent_response")


async def test_a_stream_run_streams_with_nobody_watching() -> None:
    types = await run(watcher=False, stream_when_watched=False)
    assert "agent_delta" in types


async def test_an_unwatched_chat_run_does_not_wait_for_its_responses_to_be_stored() -> None:
    """Nobody follows it live, so the run goes on while an answer waits for the writer's next
    batch; a watched run waits until each answer is stored and published."""
    buffers = EventLog._buffers
    asked: list[tuple[bool, bool]] = []  # (watched, buffered) of each agent_response emitted

    def recorded(log: EventLog, type: str) -> bool:
        buffered = buffers(log, type)
        if type == "agent_response":
            asked.append((log.watched, buffered))
        return buffered

    with mock.patch.object(EventLog, "_buffers", recorded):
        unwatched: list[list[str]] = []
        types = await run(watcher=False, stream_when_watched=True, batches=unwatched)
        assert asked == [(False, True), (False, True)]
        assert types.count("agent_response") == 2  # every answer stored all the same
        assert sum(map(len, unwatched)) == len(types)  # and sent, each once
        asked.clear()
        await run(watcher=True, stream_when_watched=True)
        assert asked == [(True, False), (True, False)]
