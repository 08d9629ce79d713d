"""PostgreSQL: a batch's events, messages, ballots and conversation counters in one transaction."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connections
from django.utils import timezone

from conversations import store
from conversations.events import EventLog, EventLogBroken
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from tests.conftest import requires_postgres

pytestmark = [pytest.mark.django_db(transaction=True), requires_postgres]


def event(conversation: Conversation, seq: int, type: str = "agent_response") -> dict[str, object]:
    return {"type": type, "conversation_id": str(conversation.pk), "seq": seq, "exchange": 1}


def message(turn: int, agent_id: str, content: str) -> dict[str, object]:
    return {"exchange": 1, "role": Message.Role.AGENT, "agent_id": agent_id, "turn": turn, "content": content}


def end_event_store_connections() -> int:
    """End the event store's pooled connections server-side, as a database restart would."""
    name = connections["default"].settings_dict["NAME"]
    with psycopg.connect(settings.CONFIG.DATABASE_URL or "", autocommit=True) as admin:
        return len(
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name = 'polyagents-events'",
                [name],
            ).fetchall()
        )


async def new_conversation() -> Conversation:
    return await Conversation.objects.acreate(owner="key:1", status="running", exchanges=1)


async def test_one_batch_writes_events_messages_votes_and_counters() -> None:
    conversation = await new_conversation()
    beat = timezone.now()
    rows = store.Rows(
        messages=[{"conversation_id": conversation.pk, **message(1, "agent_0", "Blue.")}],
        votes=[{"conversation_id": conversation.pk, "exchange": 1, "voter": "agent_0", "choice": "A"}],
        conversation={"turns_completed": 1, "heartbeat_at": beat},
    )
    await store.write_batch(conversation.pk, [event(conversation, 1), event(conversation, 2)], rows, beat)
    await conversation.arefresh_from_db()
    assert (conversation.last_seq, conversation.turns_completed, conversation.heartbeat_at) == (2, 1, beat)
    stored = await Message.objects.aget(conversation=conversation)
    # Columns the batch did not give get the model's defaults, as with the ORM.
    assert (stored.content, stored.raw_content, stored.repair_calls, stored.cost_usd) == ("Blue.", "", 0, 0.0)
    assert (stored.role, stored.status, stored.cost_estimated) == ("agent", "ok", False)
    vote = await Vote.objects.aget(conversation=conversation)
    assert (vote.choice, vote.confidence, vote.reason) == ("A", None, "")
    assert [e.data["seq"] async for e in Event.objects.filter(conversation=conversation)] == [1, 2]


async def test_a_stored_message_is_kept_and_a_ballot_is_replaced() -> None:
    conversation = await new_conversation()
    first = store.Rows(
        messages=[{"conversation_id": conversation.pk, **message(1, "agent_0", "first")}],
        votes=[{"conversation_id": conversation.pk, "exchange": 1, "voter": "agent_0", "choice": "A"}],
    )
    again = store.Rows(
        messages=[{"conversation_id": conversation.pk, **message(1, "agent_0", "second")}],
        votes=[{"conversation_id": conversation.pk, "exchange": 1, "voter": "agent_0", "choice": "B"}],
    )
    await store.write_batch(conversation.pk, [event(conversation, 1)], first, timezone.now())
    await store.write_batch(conversation.pk, [event(conversation, 2)], again, timezone.now())
    assert [m.content async for m in Message.objects.filter(conversation=conversation)] == ["first"]
    assert [v.choice async for v in Vote.objects.filter(conversation=conversation)] == ["B"]


async def test_a_failed_batch_stores_none_of_its_rows() -> None:
    conversation = await new_conversation()
    await store.write_batch(conversation.pk, [event(conversation, 1)], store.Rows(), timezone.now())
    rows = store.Rows(messages=[{"conversation_id": conversation.pk, **message(1, "agent_0", "lost")}])
    with pytest.raises(psycopg.errors.UniqueViolation):
        await store.write_batch(conversation.pk, [event(conversation, 1)], rows, timezone.now())
    assert await Message.objects.filter(conversation=conversation).acount() == 0
    await conversation.arefresh_from_db()
    assert conversation.last_seq == 1


async def test_a_batch_after_a_restarted_database_connection_is_stored_by_the_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pooled connections are not checked before each batch (one round trip less): a connection
    that died with the database fails its statement, and the event log retries on a fresh pool."""
    monkeypatch.setattr(settings.CONFIG, "EVENT_STORE_PIPELINED", True)
    conversation = await new_conversation()
    log = await EventLog.open(conversation.pk)
    await log.emit("turn_started", turn=1)
    assert end_event_store_connections()
    with pytest.raises(psycopg.OperationalError):  # the statement itself meets the dead connection
        await store.write_batch(conversation.pk, [event(conversation, 2)], store.Rows(), timezone.now())
    end_event_store_connections()
    await log.emit("turn_completed", turn=1)
    assert [e.seq async for e in Event.objects.filter(conversation=conversation).order_by("seq")] == [1, 2]


async def test_the_run_recorder_path_stages_rows_with_their_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.CONFIG, "EVENT_STORE_PIPELINED", True)
    conversation = await new_conversation()
    log = await EventLog.open(conversation.pk, buffered=True)
    assert log.pipelined
    log.stage_message(message(1, "agent_1", "Red."))
    await log.emit("agent_response", exchange=1, agent_id="agent_1", turn=1, content="Red.")
    stored = await Message.objects.aget(conversation=conversation)
    assert stored.content == "Red."
    assert await Event.objects.filter(conversation=conversation, type="agent_response").aexists()


async def test_a_broken_log_refuses_rows_staged_after_it_broke(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run behind a log whose batch could not be stored stops at once; it never spins on rows
    it staged after the log broke (it would hang its job, and its retry would never come)."""
    monkeypatch.setattr(settings.CONFIG, "EVENT_STORE_PIPELINED", True)
    conversation = await new_conversation()
    log = await EventLog.open(conversation.pk, buffered=True)

    async def refused(*args: object) -> None:
        raise psycopg.errors.UniqueViolation("refused")

    monkeypatch.setattr(store, "write_batch", refused)
    with pytest.raises(EventLogBroken):
        await log.emit("agent_response", exchange=1, agent_id="agent_1", turn=1, content="Red.")
    log.stage_conversation(turns_completed=1)
    log.stage_message(message(1, "agent_2", "Blue."))
    with pytest.raises(EventLogBroken):
        await asyncio.wait_for(log.flush(), timeout=5)
    with pytest.raises(EventLogBroken):
        await log.emit("agent_response", exchange=1, agent_id="agent_2", turn=1, content="Blue.")


async def test_rows_without_events_leave_the_conversation_counters_alone() -> None:
    conversation = await new_conversation()
    await store.write_batch(conversation.pk, [event(conversation, 1)], store.Rows(), timezone.now())
    rows = store.Rows(messages=[{"conversation_id": conversation.pk, **message(1, "agent_0", "Blue.")}])
    await store.write_batch(conversation.pk, [], rows, timezone.now())
    assert [m.content async for m in Message.objects.filter(conversation=conversation)] == ["Blue."]
    await conversation.arefresh_from_db()
    assert conversation.last_seq == 1


async def test_a_finished_run_is_stored_with_its_terminal_event(monkeypatch: pytest.MonkeyPatch) -> None:
    from conversations.services import conversation_run, conversation_start
    from gateway.principal import Principal

    monkeypatch.setattr(settings.CONFIG, "EVENT_STORE_PIPELINED", True)
    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
    conversation, exchange = await conversation_start(
        principal=principal, message="Should we ship on Friday?", num_agents=3, turns=1
    )
    done = await conversation_run(conversation_id=conversation.pk, exchange=exchange)
    stored = await Conversation.objects.aget(pk=conversation.pk)
    terminal = await Event.objects.filter(conversation=conversation).order_by("-seq").afirst()
    assert terminal is not None
    assert terminal.type == "conversation_completed"
    # One statement wrote both: the final state (a JSON field included) and the last event.
    assert stored.status == done.status == terminal.data["status"]
    assert stored.last_seq == terminal.seq
    assert stored.completed_at is not None
    assert stored.duration == terminal.data["duration"]
    assert stored.metadata["tokens"] == terminal.data["tokens"]
    assert stored.metadata["strategy"] == "majority"  # set at start, kept
    # The consensus result went in the batch of its consensus_reached event (one created_at).
    result = await ConsensusResult.objects.aget(conversation=conversation, exchange=exchange)
    reached = await Event.objects.aget(conversation=conversation, type="consensus_reached")
    assert result.created_at == reached.created_at
    # The decision does not wait for a write of its own: it goes with the terminal event.
    batch = {e.type: e.created_at async for e in Event.objects.filter(conversation=conversation)}
    assert batch["consensus_reached"] == batch["conversation_completed"]
    assert abs(result.confidence - reached.data["confidence"]) < 1e-4  # the event's is rounded
    # The instance returned is the stored row's final state.
    for name in ("status", "started_at", "turns_completed", "consensus_result", "confidence", "last_seq"):
        assert getattr(done, name) == getattr(stored, name), name


async def test_the_chat_body_read_in_one_statement_is_the_orm_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL reads an exchange's rows for the /chat body as JSON in one statement on the
    event loop's pool; the body is the one the ORM path builds, field for field."""
    from conversations.events import in_pool_thread
    from conversations.selectors import (
        CHAT_MESSAGE_FIELDS,
        CHAT_RESULT_FIELDS,
        CHAT_VOTE_FIELDS,
        achat_result,
        chat_result,
    )
    from conversations.services import conversation_run, conversation_start
    from gateway.principal import Principal

    monkeypatch.setattr(settings.CONFIG, "EVENT_STORE_PIPELINED", True)
    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
    conversation, exchange = await conversation_start(
        principal=principal, message="Tabs or spaces?", num_agents=3, turns=2
    )
    done = await conversation_run(conversation_id=conversation.pk, exchange=exchange)
    # A failed answer and an abstention, which the body reports apart from the answers.
    await Message.objects.acreate(
        conversation=done, exchange=exchange, role="agent", agent_id="agent_9", turn=1,
        status="failed", error="timeout: slow", model="m",
    )  # fmt: skip
    await Message.objects.filter(conversation=done, agent_id="agent_1", turn=2).aupdate(status="abstained")
    one_statement = await achat_result(done, exchange)
    orm = await in_pool_thread(chat_result, done, exchange)
    assert one_statement == orm
    assert one_statement["failed_agents"] == [
        {"agent_id": "agent_9", "turn": 1, "error": "timeout: slow", "model": "m"}
    ]
    assert [a["abstained"] for a in one_statement["agent_responses"]] == [False, True, False]
    assert len(one_statement["transcript"]) == 6
    assert len(one_statement["votes"]) == 3
    assert one_statement["consensus"] is not None
    # An exchange without rows reads as empty, as through the ORM.
    fields = (CHAT_MESSAGE_FIELDS, CHAT_RESULT_FIELDS, CHAT_VOTE_FIELDS)
    assert await store.exchange_rows(done.pk, exchange + 1, *fields) == ([], None, [])
    # A pooled connection that died with the database is read again on a fresh pool.
    end_event_store_connections()
    assert await achat_result(done, exchange) == orm


async def test_a_run_begins_in_one_statement_as_through_the_orm() -> None:
    """PostgreSQL marks a run running and reads what it starts from (the conversation, the
    exchange's stored answers, earlier exchanges, the last seq) in one statement; it reads
    what the ORM path reads. Missing, finished and stale runs take the ORM path."""
    from conversations.events import in_pool_thread
    from conversations.services import (
        BEGIN_MESSAGE_FIELDS,
        ConversationError,
        _abegin,
        _begin,
        conversation_run,
        conversation_start,
    )
    from gateway.principal import Principal

    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
    first, _ = await conversation_start(principal=principal, message="Tea or coffee?", num_agents=3, turns=1)
    await conversation_run(conversation_id=first.pk, exchange=1)
    conversation, exchange = await conversation_start(
        principal=principal, message="And at night?", conversation_id=first.pk, num_agents=3, turns=2
    )
    assert exchange == 2
    # An answer with its parsed position, one from before raw_content, a failure.
    stored: list[dict[str, Any]] = [
        dict(agent_id="agent_0", content="Tea.", raw_content="POSITION: Tea", position="Tea", confidence=0.8),
        dict(agent_id="agent_1", content="POSITION: Coffee\nCONFIDENCE: 0.6"),
        dict(agent_id="agent_2", status="failed", error="timeout: slow"),
    ]
    for fields in stored:
        await Message.objects.acreate(conversation=conversation, exchange=2, role="agent", turn=1, **fields)
    one = await _abegin(conversation.pk, 2)
    orm = await in_pool_thread(_begin, conversation.pk, 2)
    assert (one.question, one.prior, one.history, one.last_seq) == (
        orm.question,
        orm.prior,
        orm.history,
        orm.last_seq,
    )
    assert one.question == "And at night?"
    assert len(one.history) == 1
    assert one.history[0][0] == "Tea or coffee?"
    assert sorted(one.prior[1]) == ["agent_0", "agent_1", "agent_2"]
    assert one.last_seq > 0
    row = await Conversation.objects.aget(pk=conversation.pk)
    for f in Conversation._meta.concrete_fields:
        if f.attname not in ("heartbeat_at", "updated_at"):
            assert getattr(one.conversation, f.attname) == getattr(row, f.attname), f.attname
    assert one.conversation.status == "running"
    assert one.conversation.started_at is not None
    # That was the one statement, not the ORM path: it reads the running conversation again.
    again = await store.begin_run(conversation.pk, 2, timezone.now(), BEGIN_MESSAGE_FIELDS)
    assert again is not None
    assert [m["role"] for m in again[1]] == ["user", "agent", "agent", "agent"]
    with pytest.raises(ConversationError):
        await _abegin(conversation.pk, 1)  # not the current exchange
    await Conversation.objects.filter(pk=conversation.pk).aupdate(status="completed")
    done = await _abegin(conversation.pk, 2)
    assert (done.conversation.status, done.prior) == ("completed", {})


def test_a_chat_request_hands_its_thread_s_connection_back_before_its_run(
    client_with: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A /chat request waits a whole conversation: once its checks are done (a new key's first
    use writes its last-use time), its thread must not keep a pooled connection meanwhile (200
    waiting clients would drain the pool)."""
    from conversations.views import ChatView

    held: list[bool] = []
    initial = ChatView.initial

    def observed(view: ChatView, request: Any, *args: Any, **kwargs: Any) -> None:
        initial(view, request, *args, **kwargs)
        held.append(connections["default"].connection is not None)

    monkeypatch.setattr(ChatView, "initial", observed)
    response = client_with("read", "write").post(
        "/chat", {"message": "Cats or dogs?", "num_agents": 3, "turns": 1}, format="json"
    )
    assert response.status_code == 200, response.content
    assert held == [False]


async def test_the_warm_up_rehearses_a_run_on_every_connection_and_leaves_nothing() -> None:
    from conversations.services import rehearse_run

    pinned: list[object] = []

    async def rehearsal() -> None:
        pinned.append(store._pinned.get())
        await rehearse_run()

    before = await Conversation.objects.acount()
    await store.on_every_connection(rehearsal)
    assert len({id(conn) for conn in pinned}) == store.POOL_MAX  # each connection once
    assert None not in pinned
    assert await Conversation.objects.acount() == before  # all of it rolled back
    assert not await Event.objects.filter(type="warm_up").aexists()
    assert not await Message.objects.filter(agent_id="a").aexists()
    await store.close_pool()


@pytest.fixture
def shared_statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of batches of each shared statement (`store._write_many`) the test made."""
    counts: list[int] = []
    write_many = store._write_many

    async def recorded(writes: list[Any]) -> None:
        counts.append(len(writes))
        await write_many(writes)

    monkeypatch.setattr(store, "_write_many", recorded)
    return counts


def ballot(conversation: Conversation, voter: str, choice: str) -> dict[str, object]:
    return {"conversation_id": conversation.pk, "exchange": 1, "voter": voter, "choice": choice}


async def test_batches_of_several_conversations_ready_together_share_one_statement(
    monkeypatch: pytest.MonkeyPatch, shared_statements: list[int]
) -> None:
    conversations = [await new_conversation() for _ in range(3)]
    alone: list[int] = []
    write_one = store.write_batch

    async def one(*args: Any) -> None:
        alone.append(1)
        await write_one(*args)

    monkeypatch.setattr(store, "write_batch", one)
    now = timezone.now()
    await asyncio.gather(
        *(
            store.write_batches(
                c.pk,
                [event(c, 1), event(c, 2, "vote")],
                store.Rows(
                    messages=[{"conversation_id": c.pk, **message(1, "agent_0", f"Blue {n}.")}],
                    votes=[ballot(c, "agent_0", "A"), ballot(c, "agent_0", "B")],  # the last one wins
                    result={"conversation_id": c.pk, "exchange": 1, "method": "majority", "winner": f"B {n}"},
                ),
                now,
            )
            for n, c in enumerate(conversations)
        )
    )
    assert (shared_statements, alone) == ([3], [])
    for n, c in enumerate(conversations):
        # Each conversation's own rows and counter, as its own statement would have written them.
        await c.arefresh_from_db()
        assert c.last_seq == 2
        assert [(e.seq, e.type) async for e in Event.objects.filter(conversation=c).order_by("seq")] == [
            (1, "agent_response"),
            (2, "vote"),
        ]
        assert [m.content async for m in Message.objects.filter(conversation=c)] == [f"Blue {n}."]
        assert [v.choice async for v in Vote.objects.filter(conversation=c)] == ["B"]
        assert [r.winner async for r in ConsensusResult.objects.filter(conversation=c)] == [f"B {n}"]


async def test_a_refused_round_is_written_again_batch_by_batch_so_only_the_faulty_one_fails(
    shared_statements: list[int],
) -> None:
    good, stale = await new_conversation(), await new_conversation()
    await store.write_batch(stale.pk, [event(stale, 1)], store.Rows(), timezone.now())
    now = timezone.now()
    # A stale run writes seq 1 again: its batch is refused, the other conversation's is stored.
    results = await asyncio.gather(
        store.write_batches(good.pk, [event(good, 1), event(good, 2)], store.Rows(), now),
        store.write_batches(stale.pk, [event(stale, 1)], store.Rows(), now),
        return_exceptions=True,
    )
    assert shared_statements == [2]  # tried together first
    assert results[0] is None
    assert isinstance(results[1], psycopg.errors.UniqueViolation)
    await good.arefresh_from_db()
    assert good.last_seq == 2
    assert await Event.objects.filter(conversation=good).acount() == 2
    assert await Event.objects.filter(conversation=stale).acount() == 1


async def test_a_batch_without_events_is_written_on_its_own(shared_statements: list[int]) -> None:
    first, second, third = await new_conversation(), await new_conversation(), await new_conversation()
    now = timezone.now()
    await asyncio.gather(
        store.write_batches(first.pk, [event(first, 1)], store.Rows(), now),
        store.write_batches(
            second.pk, [], store.Rows(messages=[{"conversation_id": second.pk, **message(1, "a", "x")}]), now
        ),
        store.write_batches(third.pk, [event(third, 1)], store.Rows(), now),
    )
    assert shared_statements == [2]  # first and third
    assert await Message.objects.filter(conversation=second).aexists()
    for c in (first, second, third):
        await c.arefresh_from_db()
    assert (first.last_seq, second.last_seq, third.last_seq) == (1, 0, 1)


async def test_conversation_fields_of_several_shapes_share_the_round_as_each_batch_would_set_them(
    shared_statements: list[int],
) -> None:
    """A turn's end (its counter and heartbeat), a run's end (its final fields: text, JSON, a
    float, nulls, times) and a plain batch: one statement, each conversation's row as its own
    statement would have left it."""
    turn, final, plain, alone = [await new_conversation() for _ in range(4)]
    now = timezone.now()
    beat = now - timedelta(seconds=3)
    final_fields = {
        "status": Conversation.Status.COMPLETED,
        "turns_completed": 2,
        "consensus_result": 'Blue, "clearly".',
        "confidence": 0.75,
        "error": "",
        "duration": None,
        "completed_at": now,
        "metadata": {"strategy": "majority", "tokens": {"prompt": 10}, "note": None},
        "cost_usd": 0.0125,
    }
    await asyncio.gather(
        store.write_batches(
            turn.pk,
            [event(turn, 1)],
            store.Rows(conversation={"turns_completed": 1, "heartbeat_at": beat}),
            now,
        ),
        store.write_batches(
            final.pk, [event(final, 1), event(final, 2)], store.Rows(conversation=final_fields), now
        ),
        store.write_batches(plain.pk, [event(plain, 1)], store.Rows(), now),
    )
    assert shared_statements == [3]
    await store.write_batch(
        alone.pk, [event(alone, 1), event(alone, 2)], store.Rows(conversation=final_fields), now
    )
    for c in (turn, final, plain, alone):
        await c.arefresh_from_db()
    assert (turn.last_seq, turn.turns_completed, turn.heartbeat_at) == (1, 1, beat)
    assert plain.last_seq == 1
    fields = ["last_seq", *final_fields]
    assert {n: getattr(final, n) for n in fields} == {n: getattr(alone, n) for n in fields}
    assert {n: getattr(final, n) for n in final_fields} == final_fields


async def test_a_round_that_meets_a_restarted_database_is_retried_by_each_log(
    monkeypatch: pytest.MonkeyPatch, shared_statements: list[int]
) -> None:
    monkeypatch.setattr(settings.CONFIG, "EVENT_STORE_PIPELINED", True)
    conversations = [await new_conversation() for _ in range(3)]
    logs = [await EventLog.open(c.pk) for c in conversations]
    await asyncio.gather(*(log.emit("turn_started", turn=1) for log in logs))
    before = len(shared_statements)
    assert end_event_store_connections()
    await asyncio.gather(*(log.emit("turn_completed", turn=1) for log in logs))
    # The shared statement met the dead connection; each log retried its own batch.
    assert shared_statements[before : before + 1] == [3]
    for c in conversations:
        assert [e.seq async for e in Event.objects.filter(conversation=c).order_by("seq")] == [1, 2]


async def test_two_batches_of_one_conversation_never_share_a_statement(shared_statements: list[int]) -> None:
    conversation = await new_conversation()
    now = timezone.now()
    await asyncio.gather(
        store.write_batches(conversation.pk, [event(conversation, 1)], store.Rows(), now),
        store.write_batches(conversation.pk, [event(conversation, 2)], store.Rows(), now),
    )
    assert shared_statements == []
    await conversation.arefresh_from_db()
    assert conversation.last_seq == 2  # the later batch, as written on its own


async def test_a_new_conversation_starts_in_one_statement_as_the_orm_would(
    make_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new conversation without a budget is inserted with its question in one statement (no
    thread, no ORM): the same rows as `_start` writes, a few microseconds apart."""
    from asgiref.sync import sync_to_async

    from conversations import services
    from conversations.services import _Asked, _start_released, conversation_start
    from gateway.principal import Principal

    key, _ = await sync_to_async(make_key)(["read", "write"])
    principal = Principal(
        kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=key.pk, name="k"
    )
    with monkeypatch.context() as patched:
        patched.setattr(services, "_start", None)  # not called
        fast, exchange = await conversation_start(
            principal=principal, message="Tea or coffee?", num_agents=3, turns=2, strategy="borda"
        )
    asked = _Asked(
        "Tea or coffee?", num_agents=3, turns=2, strategy="borda", synthesis=fast.metadata["synthesis"]
    )
    orm, _ = await sync_to_async(_start_released)(
        principal=principal, asked=asked, conversation_id=None, create_with_id=False
    )
    assert exchange == 1
    skip = {"id", "created_at", "updated_at"}
    stored = [await Conversation.objects.aget(pk=c.pk) for c in (fast, orm)]
    values = [{f.attname: getattr(c, f.attname) for f in Conversation._meta.concrete_fields} for c in stored]
    assert {k: v for k, v in values[0].items() if k not in skip} == {
        k: v for k, v in values[1].items() if k not in skip
    }
    assert {f.attname: getattr(fast, f.attname) for f in Conversation._meta.concrete_fields} == values[0]
    questions = [
        [(m.exchange, m.role, m.turn, m.content) async for m in Message.objects.filter(conversation_id=c.pk)]
        for c in stored
    ]
    assert questions[0] == questions[1] == [(1, "user", 0, "Tea or coffee?")]
    assert not fast._state.adding


async def test_a_key_with_a_daily_quota_starts_through_the_orm(make_key: Any) -> None:
    """The one statement writes nothing for a key with a quota to reserve; `_start` reserves it."""
    from asgiref.sync import sync_to_async

    from conversations.services import conversation_start
    from gateway.principal import Principal

    key, _ = await sync_to_async(make_key)(["read", "write"], daily_quota=100_000)
    conversation = Conversation(api_key_id=key.pk, exchanges=1, title="Tea or coffee?")
    question = {
        "conversation_id": conversation.pk,
        "exchange": 1,
        "role": "user",
        "content": "Tea or coffee?",
    }
    assert not await store.start_conversation(conversation, question)
    assert not await Conversation.objects.filter(pk=conversation.pk).aexists()
    principal = Principal(
        kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=key.pk, name="k"
    )
    started, _ = await conversation_start(
        principal=principal, message="Tea or coffee?", num_agents=3, turns=1
    )
    assert started.metadata["quota"]["unit"] == "tokens"  # reserved


def test_with_the_pipelined_store_off_a_chat_never_uses_the_loop_s_pool(
    client_with: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EVENT_STORE_PIPELINED=false means the ORM for everything the event store's statements
    do: the block and key check, the start, the run's begin and batches, the /chat body's read."""
    monkeypatch.setattr(settings.CONFIG, "EVENT_STORE_PIPELINED", False)
    opened: list[str] = []

    async def no_pool() -> None:
        opened.append("pool")
        raise AssertionError("the event loop's pool was used")

    monkeypatch.setattr(store, "pool", no_pool)
    response = client_with("read", "write").post(
        "/chat", {"message": "Tea or coffee?", "num_agents": 3, "turns": 1}, format="json"
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["metadata"]["status"] in ("completed", "no_consensus")
    assert len(body["agent_responses"]) == 3
    assert opened == []
    conversation = Conversation.objects.get(pk=body["conversation_id"])
    assert conversation.last_seq == Event.objects.filter(conversation=conversation).count() > 0


def test_an_event_row_written_out_holds_every_column_of_the_model() -> None:
    """`_event_json` writes the row without an encoder: every Event column but the key, each as
    the encoder would have written it (a type with a quote included)."""
    import json
    import uuid

    conversation_id = uuid.uuid4()
    event = {"seq": 7, "type": 'odd "type"', "conversation_id": str(conversation_id)}
    row = json.loads(
        store._event_json(conversation_id, event, store.event_text(event), "2026-01-01T00:00:00+00:00")
    )
    columns = {f.column for f in Event._meta.concrete_fields if not f.primary_key}
    assert set(row) == columns
    assert row == {
        "conversation_id": str(conversation_id),
        "seq": 7,
        "type": 'odd "type"',
        "created_at": "2026-01-01T00:00:00+00:00",
        "data": event,
    }


def test_an_event_s_text_is_the_json_the_standard_library_would_read_back() -> None:
    """`event_text` (orjson) gives the JSON value `json.dumps` gave: integer keys as strings,
    non-ASCII text kept (as UTF-8, not escaped), floats and nesting as they were."""
    import json

    event = {"type": "consensus_reached", "seq": 3, "tallies": {1: 2, "Rot": 1}, "answer": "Grün ✓"}
    text = store.event_text(event)
    assert json.loads(text) == json.loads(json.dumps(event))
    assert "Grün ✓" in text  # not escaped
    assert " " not in text.replace("Grün ✓", "")  # compact


def test_a_chat_stores_its_new_conversation_running_and_begins_without_a_statement(
    client_with: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/chat runs its exchange at once: the new conversation is inserted already running (its
    start and heartbeat set), and the run begins from it instead of a begin statement."""
    begins: list[object] = []
    begin_run = store.begin_run

    async def counted(*args: Any, **kwargs: Any) -> Any:
        begins.append(args[0])
        return await begin_run(*args, **kwargs)

    monkeypatch.setattr(store, "begin_run", counted)
    chat = client_with("read", "write")
    response = chat.post("/chat", {"message": "Tea or coffee?", "num_agents": 3, "turns": 1}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert len(body["agent_responses"]) == 3
    assert begins == []
    conversation = Conversation.objects.get(pk=body["conversation_id"])
    assert conversation.status in ("completed", "no_consensus")
    assert conversation.started_at == conversation.created_at
    assert conversation.last_seq == Event.objects.filter(conversation=conversation).count() > 0
    assert Message.objects.get(conversation=conversation, role=Message.Role.USER).content == "Tea or coffee?"
    # A next exchange of it reads what came before: its run begins with the statement.
    follow_up = {"message": "And with milk?", "conversation_id": str(conversation.pk), "turns": 1}
    again = chat.post("/chat", follow_up, format="json")
    assert again.status_code == 200, again.content
    assert begins == [conversation.pk]
