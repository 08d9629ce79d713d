"""WS /ws/{id} through WebsocketCommunicator: auth, origin, replay, live follow, client messages."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from conversations.events import EventLog, group_name
from conversations.models import Conversation, Event
from gateway.models import ApiKey, BlockedIP
from polyagents_site.asgi import application
from telemetry.metrics import OPEN_WEBSOCKETS

pytestmark = pytest.mark.django_db(transaction=True)

KeyMaker = Callable[..., tuple[ApiKey, str]]


async def new_key(make_key: KeyMaker, permissions: list[str] | None = None) -> tuple[ApiKey, str]:
    return await sync_to_async(make_key)(permissions if permissions is not None else ["read", "write"])


async def new_conversation(owner: str, events: int = 0, status: str = "running") -> Conversation:
    conversation = await Conversation.objects.acreate(owner=owner, status=status, exchanges=1)
    log = await EventLog.open(conversation.pk)
    for n in range(events):
        await log.emit("agent_delta", agent_id="agent_0", turn=1, delta=f"chunk {n + 1}")
    return conversation


def communicator(
    path: str, *, headers: list[tuple[bytes, bytes]] | None = None, **kwargs: Any
) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, path, headers=headers or [(b"host", b"testserver")], **kwargs)


async def expect_close(comm: WebsocketCommunicator, code: int) -> None:
    connected, _ = await comm.connect()
    assert connected  # accepted first, so browsers see the close code
    message = await comm.receive_output(timeout=3)
    assert message == {"type": "websocket.close", "code": code}
    await comm.wait()


async def receive_seqs(comm: WebsocketCommunicator, count: int) -> list[int]:
    return [(await comm.receive_json_from(timeout=3))["seq"] for _ in range(count)]


async def test_missing_token_closes_4401() -> None:
    await expect_close(communicator(f"/ws/{uuid.uuid4()}"), 4401)


async def test_bad_token_closes_4401(make_key: KeyMaker) -> None:
    await expect_close(communicator(f"/ws/{uuid.uuid4()}?token=pk_not_a_real_key_000000"), 4401)


async def test_key_without_read_permission_closes_4403(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key, ["write"])
    conversation = await new_conversation(f"key:{row.pk}")
    await expect_close(communicator(f"/ws/{conversation.pk}?token={raw}"), 4403)


async def test_another_owners_conversation_closes_4403(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    conversation = await new_conversation("key:999999", events=1)
    await expect_close(communicator(f"/ws/{conversation.pk}?token={raw}"), 4403)


async def test_admin_reads_any_conversation(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key, ["admin"])
    conversation = await new_conversation("key:999999", events=2)
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    assert await receive_seqs(comm, 2) == [1, 2]
    await comm.disconnect()


async def test_unknown_conversation_closes_4404(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    await expect_close(communicator(f"/ws/{uuid.uuid4()}?token={raw}"), 4404)


async def test_malformed_id_closes_4404(make_key: KeyMaker) -> None:
    _, raw = await new_key(make_key)
    await expect_close(communicator(f"/ws/not-a-uuid?token={raw}"), 4404)


async def test_token_as_dotted_subprotocol_is_echoed(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}", events=1)
    comm = communicator(f"/ws/{conversation.pk}", subprotocols=[f"bearer.{raw}"])
    connected, subprotocol = await comm.connect()
    assert connected
    assert subprotocol == f"bearer.{raw}"
    assert await receive_seqs(comm, 1) == [1]
    await comm.disconnect()


async def test_token_as_subprotocol_pair_echoes_bearer(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}", events=1)
    comm = communicator(f"/ws/{conversation.pk}", subprotocols=["bearer", raw])
    connected, subprotocol = await comm.connect()
    assert (connected, subprotocol) == (True, "bearer")
    assert await receive_seqs(comm, 1) == [1]
    await comm.disconnect()


async def test_foreign_origin_is_refused_at_handshake(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}")
    comm = communicator(
        f"/ws/{conversation.pk}?token={raw}",
        headers=[(b"host", b"testserver"), (b"origin", b"https://evil.example")],
    )
    connected, code = await comm.connect()
    assert (connected, code) == (False, 4403)


async def test_own_host_and_cors_origins_are_allowed(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}")
    for origin in (b"http://testserver", b"https://app.example"):
        with override_settings(CORS_ALLOWED_ORIGINS=["https://app.example"]):
            comm = communicator(
                f"/ws/{conversation.pk}?token={raw}", headers=[(b"host", b"testserver"), (b"origin", origin)]
            )
            assert (await comm.connect())[0]
            await comm.send_json_to({"type": "ping"})
            assert await comm.receive_json_from(timeout=3) == {"type": "pong"}
            await comm.disconnect()


async def test_blocked_ip_is_refused(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}")
    await sync_to_async(BlockedIP.block_for)("203.0.113.7", 600, reason="test")
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    comm.scope["client"] = ("203.0.113.7", 40000)
    connected, _ = await comm.connect()
    assert not connected


async def test_replay_after_n_sends_exactly_the_later_events(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}", events=5)
    comm = communicator(f"/ws/{conversation.pk}?token={raw}&after=2")
    assert (await comm.connect())[0]
    assert await receive_seqs(comm, 3) == [3, 4, 5]
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()


async def test_live_events_follow_the_replay(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}", events=2)
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    assert await receive_seqs(comm, 2) == [1, 2]
    log = await EventLog.open(conversation.pk)
    await log.emit("turn_completed", turn=1)
    await log.emit("consensus_update", turn=1, consensus="yes", confidence=0.75)
    third = await comm.receive_json_from(timeout=3)
    fourth = await comm.receive_json_from(timeout=3)
    assert (third["seq"], third["type"]) == (3, "turn_completed")
    assert (fourth["seq"], fourth["confidence"]) == (4, 0.75)
    await comm.disconnect()


async def test_duplicates_are_dropped_and_gaps_filled_from_the_log(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}", events=3)
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    assert await receive_seqs(comm, 3) == [1, 2, 3]
    layer = get_channel_layer()
    stored = [e async for e in Event.objects.filter(conversation=conversation).values_list("data", flat=True)]
    for event in stored:  # all replayed already: every one is a duplicate
        await layer.group_send(group_name(conversation.pk), {"type": "conversation.event", "event": event})
    assert await comm.receive_nothing(timeout=0.3)
    # Seq 4 is stored but its live message is lost; seq 5 arrives live: 4 is filled in first.
    lost = {**stored[-1], "seq": 4, "type": "turn_started"}
    await Event.objects.acreate(conversation=conversation, seq=4, type="turn_started", data=lost)
    await EventLog(conversation.pk, 4).emit("agent_response", agent_id="agent_0", turn=2, content="done")
    assert await receive_seqs(comm, 2) == [4, 5]
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()


async def test_ping_gets_pong(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}")
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "ping"})
    assert await comm.receive_json_from(timeout=3) == {"type": "pong"}
    await comm.send_json_to({"type": "dance"})
    assert (await comm.receive_json_from(timeout=3))["code"] == "unknown_message"
    await comm.send_to(text_data="{not json")
    assert (await comm.receive_json_from(timeout=3))["code"] == "invalid_json"
    await comm.disconnect()


async def test_cancel_sets_the_flag(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}")
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "cancel"})
    assert (await comm.receive_json_from(timeout=3))["type"] == "cancel_requested"
    await comm.disconnect()
    await conversation.arefresh_from_db()
    assert conversation.cancel_requested


async def test_cancel_needs_write_permission(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key, ["read"])
    conversation = await new_conversation(f"key:{row.pk}")
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "cancel"})
    assert (await comm.receive_json_from(timeout=3))["code"] == "forbidden"
    await comm.disconnect()
    await conversation.arefresh_from_db()
    assert not conversation.cancel_requested


async def test_resume_replays_from_the_given_seq(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}", events=4)
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    assert await receive_seqs(comm, 4) == [1, 2, 3, 4]
    await comm.send_json_to({"type": "resume", "after": 2})
    assert await receive_seqs(comm, 2) == [3, 4]
    await comm.send_json_to({"type": "resume", "after": -1})
    assert (await comm.receive_json_from(timeout=3))["code"] == "invalid"
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()


async def test_open_websockets_gauge_counts_connections(make_key: KeyMaker) -> None:
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}")
    before = OPEN_WEBSOCKETS._value.get()
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "ping"})
    await comm.receive_json_from(timeout=3)
    assert OPEN_WEBSOCKETS._value.get() == before + 1
    await comm.disconnect()
    assert OPEN_WEBSOCKETS._value.get() == before


async def test_jwt_access_token_in_the_query_string_is_accepted(make_key: KeyMaker) -> None:
    from gateway.tokens import issue_for_key

    row, _ = await new_key(make_key)
    pair = await sync_to_async(issue_for_key)(row)
    conversation = await new_conversation(f"key:{row.pk}", events=2)
    comm = communicator(f"/ws/{conversation.pk}?token={pair.access}&after=1")
    assert (await comm.connect())[0]
    assert await receive_seqs(comm, 1) == [2]
    await comm.disconnect()


async def test_tampered_jwt_closes_4401(make_key: KeyMaker) -> None:
    from gateway.tokens import issue_for_key

    row, _ = await new_key(make_key)
    pair = await sync_to_async(issue_for_key)(row)
    conversation = await new_conversation(f"key:{row.pk}")
    await expect_close(communicator(f"/ws/{conversation.pk}", subprotocols=[f"bearer.{pair.access}x"]), 4401)


async def test_an_event_never_published_live_still_arrives_by_catch_up(
    make_key: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streaming.consumers import ConversationConsumer

    monkeypatch.setattr(ConversationConsumer, "catch_up_seconds", 0.2)
    row, raw = await new_key(make_key)
    conversation = await new_conversation(f"key:{row.pk}", events=2)
    comm = communicator(f"/ws/{conversation.pk}?token={raw}")
    assert (await comm.connect())[0]
    assert await receive_seqs(comm, 2) == [1, 2]
    # The final event is stored, but its live message is lost (no later event fills the gap).
    final = {"type": "conversation_completed", "conversation_id": str(conversation.pk), "seq": 3}
    await Event.objects.acreate(conversation=conversation, seq=3, type="conversation_completed", data=final)
    await Conversation.objects.filter(pk=conversation.pk).aupdate(last_seq=3)
    assert await comm.receive_json_from(timeout=3) == final
    assert await comm.receive_nothing(timeout=0.5)
    await comm.disconnect()
