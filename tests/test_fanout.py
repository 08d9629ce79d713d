"""Live fan-out: one event is serialised once, decoded once per process, sent verbatim to each socket."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import channels.consumer
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings

from conversations.events import EventLog, group_name
from conversations.models import Conversation
from gateway.models import ApiKey
from polyagents_site.asgi import application
from streaming.layers import LocalFanoutPubSubChannelLayer
from tests.conftest import requires_redis

pytestmark = pytest.mark.django_db(transaction=True)

KeyMaker = Callable[..., tuple[ApiKey, str]]


async def _group_of_three(layer: Any) -> list[dict[str, Any]]:
    group = f"fanout-{uuid.uuid4().hex}"
    members = [await layer.new_channel() for _ in range(3)]
    for member in members:
        await layer.group_add(group, member)
    await layer.group_send(group, {"type": "conversation.event", "event": {"seq": 1}, "text": '{"seq": 1}'})
    return [await asyncio.wait_for(layer.receive(member), 5) for member in members]


@requires_redis
async def test_a_group_message_is_decoded_once_for_every_local_member() -> None:
    layer = LocalFanoutPubSubChannelLayer(hosts=[settings.REDIS_URL], prefix=f"{settings.REDIS_KEY_PREFIX}:t")
    try:
        received = await _group_of_three(layer)
    finally:
        await layer.flush()
    assert received[0] == {"type": "conversation.event", "event": {"seq": 1}, "text": '{"seq": 1}'}
    assert received[0] is received[1] is received[2]


@requires_redis
async def test_the_stock_pubsub_layer_decodes_a_copy_per_member() -> None:
    """What the layer above saves: channels_redis hands each member its own decoded copy."""
    layer = RedisPubSubChannelLayer(hosts=[settings.REDIS_URL], prefix=f"{settings.REDIS_KEY_PREFIX}:t")
    try:
        received = await _group_of_three(layer)
    finally:
        await layer.flush()
    assert received[0] == received[1] == received[2]
    assert received[0] is not received[1]


@requires_redis
def test_redis_deployments_use_the_decode_once_layer() -> None:
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "streaming.layers.LocalFanoutPubSubChannelLayer"


async def test_a_published_event_carries_its_json_text() -> None:
    conversation = await Conversation.objects.acreate(owner="key:1", status="running", exchanges=1)
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name(conversation.pk), channel)
    emitted = await (await EventLog.open(conversation.pk)).emit("turn_started", turn=1)
    message = await asyncio.wait_for(layer.receive(channel), timeout=5)
    assert message["events"] == [emitted]
    assert [json.loads(text) for text in message["texts"]] == [emitted]


async def _follower(make_key: KeyMaker) -> tuple[WebsocketCommunicator, Conversation]:
    row, raw = await sync_to_async(make_key)(["read", "write"])
    conversation = await Conversation.objects.acreate(owner=f"key:{row.pk}", status="running", exchanges=1)
    comm = WebsocketCommunicator(application, f"/ws/{conversation.pk}?token={raw}", headers=[(b"host", b"t")])
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "ping"})  # answered once the consumer has joined the group
    assert await comm.receive_json_from(timeout=3) == {"type": "pong"}
    return comm, conversation


async def test_a_live_event_is_sent_as_the_publisher_serialised_it(make_key: KeyMaker) -> None:
    comm, conversation = await _follower(make_key)
    event = {"type": "turn_started", "conversation_id": str(conversation.pk), "seq": 1, "turn": 1}
    text = '{"type":"turn_started","seq":1,"marker":"serialised by the publisher"}'
    await get_channel_layer().group_send(
        group_name(conversation.pk), {"type": "conversation.event", "event": event, "text": text}
    )
    assert await comm.receive_from(timeout=3) == text
    # A message without text (an older publisher) is serialised by the consumer.
    second = {**event, "seq": 2}
    await get_channel_layer().group_send(
        group_name(conversation.pk), {"type": "conversation.event", "event": second}
    )
    assert await comm.receive_json_from(timeout=3) == second
    await comm.disconnect()


async def test_live_events_skip_the_per_message_database_hop(
    make_key: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    comm, conversation = await _follower(make_key)
    hops: list[str] = []
    original = channels.consumer.aclose_old_connections

    async def counting() -> None:
        hops.append("close")
        await original()

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counting)
    log = await EventLog.open(conversation.pk)
    for turn in range(1, 4):
        await log.emit("turn_started", turn=turn)
    assert [(await comm.receive_json_from(timeout=3))["seq"] for _ in range(3)] == [1, 2, 3]
    assert hops == []
    await comm.send_json_to({"type": "ping"})  # any other message still goes through Channels' dispatch
    assert await comm.receive_json_from(timeout=3) == {"type": "pong"}
    assert hops == ["close"]
    await comm.disconnect()


async def test_followers_of_a_conversation_share_one_last_seq_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from streaming import consumers

    conversation = await Conversation.objects.acreate(
        owner="key:1", status="running", exchanges=1, last_seq=3
    )
    reads = await asyncio.gather(*(consumers.stored_last_seq(conversation.pk) for _ in range(50)))
    assert reads == [3] * 50
    await Conversation.objects.filter(pk=conversation.pk).aupdate(last_seq=7)
    assert await consumers.stored_last_seq(conversation.pk) == 3  # the read of this second, shared
    monkeypatch.setattr(consumers, "LAST_SEQ_SHARED_SECONDS", 0.0)
    assert await consumers.stored_last_seq(conversation.pk) == 7
    assert await consumers.stored_last_seq(uuid.uuid4()) is None
