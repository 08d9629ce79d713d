"""One heartbeat per process for all its runs; cancellation pushed, with the flag as fallback."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from agents.providers.registry import reset_providers
from conversations import liveness
from conversations.events import redis_client
from conversations.models import Conversation
from conversations.services import conversation_cancel, conversation_run, conversation_start
from gateway.principal import Principal
from tests.conftest import requires_redis

pytestmark = pytest.mark.django_db(transaction=True)

PRINCIPAL = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)


@pytest.fixture
def slow_agents(monkeypatch: pytest.MonkeyPatch):
    reset_providers()
    monkeypatch.setattr(settings.CONFIG, "SIMULATED_LATENCY", 0.5)
    yield
    reset_providers()


async def start_run() -> tuple[Conversation, asyncio.Task[Conversation]]:
    conversation, exchange = await conversation_start(
        principal=PRINCIPAL, message="Tabs or spaces?", num_agents=2, turns=4
    )
    run = asyncio.ensure_future(conversation_run(conversation_id=conversation.pk, exchange=exchange))
    for _ in range(100):  # until the run has joined this loop's pulse
        if conversation.pk in liveness.pulse().runs:
            break
        await asyncio.sleep(0.02)
    return conversation, run


async def test_a_cancel_is_pushed_to_a_run_of_this_process_at_once(slow_agents, monkeypatch) -> None:
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 60.0)  # no beat will come: only the push
    conversation, run = await start_run()
    asked = time.monotonic()
    await conversation_cancel(conversation_id=conversation.pk)
    done = await asyncio.wait_for(run, timeout=10)
    assert done.status == "cancelled"
    assert time.monotonic() - asked < 1.0
    assert conversation.pk not in liveness.pulse().runs


async def test_a_flag_set_without_a_push_is_read_at_the_next_beat(slow_agents, monkeypatch) -> None:
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 0.05)
    conversation, run = await start_run()
    # Another process set the flag and its push was lost (Redis away): the beat finds it.
    await Conversation.objects.filter(pk=conversation.pk).aupdate(cancel_requested=True)
    done = await asyncio.wait_for(run, timeout=10)
    assert done.status == "cancelled"


@requires_redis
async def test_a_cancel_published_by_another_process_stops_the_run(slow_agents, monkeypatch) -> None:
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 60.0)
    conversation, run = await start_run()
    await Conversation.objects.filter(pk=conversation.pk).aupdate(cancel_requested=True)
    client = redis_client()
    assert client is not None
    for _ in range(50):  # until the pulse's listener has subscribed
        if (await client.pubsub_numsub(liveness.cancel_channel()))[0][1]:
            break
        await asyncio.sleep(0.05)
    asked = time.monotonic()
    assert await client.publish(liveness.cancel_channel(), str(conversation.pk)) >= 1
    done = await asyncio.wait_for(run, timeout=10)
    assert done.status == "cancelled"
    assert time.monotonic() - asked < 1.0


async def test_one_beat_saves_every_run_and_cancels_only_the_flagged_ones() -> None:
    long_ago = timezone.now() - timedelta(minutes=5)
    conversations = [
        await Conversation.objects.acreate(owner="key:1", status="running", heartbeat_at=long_ago)
        for _ in range(3)
    ]
    await Conversation.objects.filter(pk=conversations[1].pk).aupdate(cancel_requested=True)
    pulse = liveness.Pulse(asyncio.get_running_loop())
    idle = [asyncio.ensure_future(asyncio.sleep(60)) for _ in conversations]
    for conversation, task in zip(conversations, idle, strict=True):
        pulse.runs[conversation.pk] = task  # registered without starting the beat's own loop
    before = timezone.now()
    await pulse.beat()
    await asyncio.sleep(0)  # let the cancellation land
    beats = [c.heartbeat_at async for c in Conversation.objects.filter(pk__in=[c.pk for c in conversations])]
    assert all(beat is not None and beat >= before for beat in beats)
    assert [task.cancelled() for task in idle] == [False, True, False]
    for task in idle:
        task.cancel()


async def test_the_pulse_stops_some_beats_after_its_last_run_ends(slow_agents, monkeypatch) -> None:
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(liveness, "IDLE_BEATS", 3)
    conversation, run = await start_run()
    pulse = liveness.pulse()
    beating = pulse._beating
    assert beating is not None
    assert not beating.done()
    await conversation_cancel(conversation_id=conversation.pk)
    await asyncio.wait_for(run, timeout=10)
    assert pulse.runs == {}
    assert not beating.done()  # kept for the next run for a few beats
    await asyncio.wait_for(beating, timeout=5)
    assert pulse._beating is None
    assert pulse._listening is None
