"""POST /stream/{id}: validation, permissions, conflicts, and a full background run followed over WS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import AsyncClient

from agents.providers.registry import reset_providers
from conversations.models import Conversation, Event, Message
from gateway.models import ApiKey
from polyagents_site.asgi import application
from streaming.jobs import wait_for_background_runs

pytestmark = pytest.mark.django_db(transaction=True)

KeyMaker = Callable[..., tuple[ApiKey, str]]


async def new_key(make_key: KeyMaker, permissions: list[str] | None = None) -> tuple[ApiKey, str]:
    return await sync_to_async(make_key)(permissions if permissions is not None else ["read", "write"])


async def post_stream(raw: str | None, conversation_id: object, body: Any) -> Any:
    headers = {"Authorization": f"Bearer {raw}"} if raw else {}
    return await AsyncClient().post(
        f"/stream/{conversation_id}", body, content_type="application/json", headers=headers
    )


async def drain_runs() -> None:
    """Let the background run finish: in-process on SQLite, a burst worker on PostgreSQL."""
    if settings.USING_POSTGRES:
        from streaming.tasks import run_worker_until_idle

        await run_worker_until_idle()
    else:
        await wait_for_background_runs(timeout=60)


async def test_stream_returns_202_with_the_websocket_url(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation_id = uuid.uuid4()
    response = await post_stream(
        raw, conversation_id, {"message": "Is water wet?", "num_agents": 2, "turns": 1}
    )
    assert response.status_code == 202
    assert response.json() == {
        "conversation_id": str(conversation_id),
        "status": "started",
        "websocket_url": f"/ws/{conversation_id}",
        "exchange": 1,
    }
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.owner == f"key:{row.pk}"
    assert (conversation.num_agents, conversation.turns_requested) == (2, 1)
    await drain_runs()
    await conversation.arefresh_from_db()
    assert conversation.status in ("completed", "no_consensus")
    types = [t async for t in Event.objects.filter(conversation=conversation).values_list("type", flat=True)]
    assert types[0] == "conversation_started"
    assert types[-1] == "conversation_completed"
    assert "agent_response" in types
    assert "consensus_update" in types


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": "hi", "turns": 0}, "turns"),
        ({"message": "hi", "num_agents": 999}, "num_agents"),
        ({"message": "hi", "colour": "red"}, "colour"),
        ({"message": "bad\x00byte"}, "message"),
    ],
)
async def test_bad_bodies_are_400_and_write_nothing(
    make_key: KeyMaker, body: dict[str, Any], field: str
) -> None:
    _, raw = await new_key(make_key)
    conversation_id = uuid.uuid4()
    response = await post_stream(raw, conversation_id, body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == "invalid"
    assert field in payload["errors"]
    assert not await Conversation.objects.filter(pk=conversation_id).aexists()


async def test_malformed_conversation_id_is_400(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    response = await post_stream(raw, "not-a-uuid", {"message": "hi"})
    assert response.status_code == 400
    assert "conversation_id" in response.json()["errors"]


async def test_body_id_must_match_the_path(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    response = await post_stream(raw, uuid.uuid4(), {"message": "hi", "conversation_id": str(uuid.uuid4())})
    assert response.status_code == 400
    assert "conversation_id" in response.json()["errors"]


async def test_no_key_is_401_and_read_only_key_is_403(make_key: KeyMaker) -> None:
    assert (await post_stream(None, uuid.uuid4(), {"message": "hi"})).status_code == 401
    _, raw = await new_key(make_key, ["read"])
    conversation_id = uuid.uuid4()
    response = await post_stream(raw, conversation_id, {"message": "hi"})
    assert response.status_code == 403
    assert not await Conversation.objects.filter(pk=conversation_id).aexists()


async def test_second_post_while_running_is_409_and_never_a_second_run(
    make_key: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slow agents, so the first run is certainly still going when the second POST arrives.
    monkeypatch.setattr(settings.CONFIG, "SIMULATED_LATENCY", 0.3)
    reset_providers()
    _, raw = await new_key(make_key)
    conversation_id = uuid.uuid4()
    first = await post_stream(
        raw, conversation_id, {"message": "Tea or coffee?", "num_agents": 2, "turns": 1}
    )
    second = await post_stream(
        raw, conversation_id, {"message": "Tea or coffee?", "num_agents": 2, "turns": 1}
    )
    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["code"] == "conversation_running"
    await drain_runs()
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.exchanges == 1
    assert await Message.objects.filter(conversation=conversation, role="user").acount() == 1
    starts = await Event.objects.filter(conversation=conversation, type="conversation_started").acount()
    assert starts == 1
    reset_providers()


async def test_a_finished_conversation_continues_with_a_new_exchange(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    conversation_id = uuid.uuid4()
    assert (
        await post_stream(raw, conversation_id, {"message": "One?", "num_agents": 2, "turns": 1})
    ).status_code == 202
    await drain_runs()
    again = await post_stream(raw, conversation_id, {"message": "Two?", "num_agents": 2, "turns": 1})
    assert again.status_code == 202
    assert again.json()["exchange"] == 2
    await drain_runs()
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.exchanges == 2
    assert await Event.objects.filter(conversation=conversation, type="conversation_started").acount() == 2


async def test_another_owners_conversation_id_is_refused(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    other = await Conversation.objects.acreate(owner="key:424242", status="completed", exchanges=1)
    response = await post_stream(raw, other.pk, {"message": "mine now?"})
    assert response.status_code == 404
    await other.arefresh_from_db()
    assert other.exchanges == 1


async def test_followed_over_websocket_every_event_arrives_once_in_order(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    conversation_id = uuid.uuid4()
    response = await post_stream(
        raw, conversation_id, {"message": "Cats or dogs?", "num_agents": 3, "turns": 2}
    )
    assert response.status_code == 202
    comm = WebsocketCommunicator(application, f"{response.json()['websocket_url']}?token={raw}")
    assert (await comm.connect())[0]
    runner = asyncio.ensure_future(drain_runs())
    received: list[dict[str, Any]] = []
    while not received or received[-1]["type"] not in ("conversation_completed", "conversation_failed"):
        received.append(await comm.receive_json_from(timeout=30))
    await runner
    await comm.disconnect()
    assert [e["seq"] for e in received] == list(range(1, len(received) + 1))
    stored = await Event.objects.filter(conversation_id=conversation_id).acount()
    assert stored == len(received)
    assert received[-1]["type"] == "conversation_completed"
    assert {e["agent_id"] for e in received if e["type"] == "agent_response"} == {
        "agent_0",
        "agent_1",
        "agent_2",
    }
