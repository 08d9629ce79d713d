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

from conversations.events import EventLog
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from conversations.store import Rows, event_store, event_text
from conversations.store import postgres as pg_store
from loopstate import postgres as pg
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


async def test_a_batch_after_a_restarted_database_connection_is_stored_by_the_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pooled connections are not checked before each batch (one round trip less): a connection
    that died with the database fails its statement, and the event log retries on a fresh pool."""
    conversation = await new_conversation()
    log = await EventLog.open(conversation.pk)
    await log.emit("turn_started", turn=1)
    assert end_event_store_connections()
    with pytest.raises(psycopg.OperationalError):  # the statement itself meets the dead connection
        await event_store().write_batch(conversation.pk, [event(conversation, 2)], Rows(), timezone.now())
    end_event_store_connections()
    await log.emit("turn_completed", turn=1)
    assert [e.seq async for e in Event.objects.filter(conversation=conversation).order_by("seq")] == [1, 2]


async def test_a_finished_run_is_stored_with_its_terminal_event(monkeypatch: pytest.MonkeyPatch) -> None:
    from conversations.services import conversation_run, conversation_start
    from gateway.principal import Principal

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


async def test_the_chat_body_read_in_one_statement_is_the_orm_s() -> None:
    """PostgreSQL reads an exchange's rows for the /chat body as JSON in one statement on the
    event loop's pool; the rows and the body are the ORM's, field for field."""
    from conversations.selectors import achat_result, chat_body
    from conversations.services import conversation_run, conversation_start
    from conversations.store.sqlite import SqliteEventStore
    from gateway.principal import Principal

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
    orm_rows = await SqliteEventStore().exchange_rows(done.pk, exchange)
    assert await event_store().exchange_rows(done.pk, exchange) == orm_rows
    assert one_statement == chat_body(done, exchange, *orm_rows)
    assert one_statement["failed_agents"] == [
        {"agent_id": "agent_9", "turn": 1, "error": "timeout: slow", "model": "m"}
    ]
    assert [a["abstained"] for a in one_statement["agent_responses"]] == [False, True, False]
    assert len(one_statement["transcript"]) == 6
    # A pooled connection that died with the database is read again on a fresh pool.
    end_event_store_connections()
    assert await achat_result(done, exchange) == one_statement


async def test_a_run_begins_in_one_statement_as_through_the_orm() -> None:
    """PostgreSQL marks a run running and reads what it starts from in one statement; it reads
    what the ORM backend reads."""
    from conversations.services import conversation_run, conversation_start
    from conversations.store.sqlite import SqliteEventStore
    from gateway.principal import Principal

    principal = Principal(kind="api_key", permissions=frozenset({"read", "write"}), api_key_id=None)
    first, _ = await conversation_start(principal=principal, message="Tea or coffee?", num_agents=3, turns=1)
    await conversation_run(conversation_id=first.pk, exchange=1)
    conversation, exchange = await conversation_start(
        principal=principal, message="And at night?", conversation_id=first.pk, num_agents=3, turns=2
    )
    stored: list[dict[str, Any]] = [
        dict(agent_id="agent_0", content="Tea.", raw_content="POSITION: Tea", position="Tea", confidence=0.8),
        dict(agent_id="agent_1", content="POSITION: Coffee\nCONFIDENCE: 0.6"),
        dict(agent_id="agent_2", status="failed", error="timeout: slow"),
    ]
    for fields in stored:
        await Message.objects.acreate(conversation=conversation, exchange=2, role="agent", turn=1, **fields)
    now = timezone.now()
    one = await event_store().begin_run(conversation.pk, exchange, now)
    orm = await SqliteEventStore().begin_run(conversation.pk, exchange, now)
    assert one is not None
    assert orm is not None
    assert (one.messages, one.questions, one.answers, one.last_seq) == (
        orm.messages,
        orm.questions,
        orm.answers,
        orm.last_seq,
    )
    assert [m["role"] for m in one.messages] == ["user", "agent", "agent", "agent"]
    for f in Conversation._meta.concrete_fields:
        assert getattr(one.conversation, f.attname) == getattr(orm.conversation, f.attname), f.attname


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
        pinned.append(pg._pinned.get())
        await rehearse_run()

    before = await Conversation.objects.acount()
    await pg.on_every_connection(rehearsal)
    assert len({id(conn) for conn in pinned}) == pg.POOL_MAX  # each connection once
    assert None not in pinned
    assert await Conversation.objects.acount() == before  # all of it rolled back
    assert not await Event.objects.filter(type="warm_up").aexists()
    assert not await Message.objects.filter(agent_id="a").aexists()
    await pg.close_pool()


@pytest.fixture
def shared_statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of batches of each shared statement the test made (`store.postgres.BATCH`
    with the batches of several conversations); `alone` the batches written on their own."""
    counts: list[int] = []
    params = pg_store.batch_params

    def recorded(writes: list[Any]) -> dict[str, str]:
        counts.append(len(writes))
        return params(writes)

    monkeypatch.setattr(pg_store, "batch_params", recorded)
    return counts


def ballot(conversation: Conversation, voter: str, choice: str) -> dict[str, object]:
    return {"conversation_id": conversation.pk, "exchange": 1, "voter": voter, "choice": choice}


async def test_batches_of_several_conversations_ready_together_share_one_statement(
    monkeypatch: pytest.MonkeyPatch, shared_statements: list[int]
) -> None:
    conversations = [await new_conversation() for _ in range(3)]
    now = timezone.now()
    await asyncio.gather(
        *(
            event_store().write_batch(
                c.pk,
                [event(c, 1), event(c, 2, "vote")],
                Rows(
                    messages=[{"conversation_id": c.pk, **message(1, "agent_0", f"Blue {n}.")}],
                    votes=[ballot(c, "agent_0", "A"), ballot(c, "agent_0", "B")],  # the last one wins
                    result={"conversation_id": c.pk, "exchange": 1, "method": "majority", "winner": f"B {n}"},
                ),
                now,
            )
            for n, c in enumerate(conversations)
        )
    )
    assert shared_statements == [3]  # none written alone
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
    await event_store().write_batch(stale.pk, [event(stale, 1)], Rows(), timezone.now())
    now = timezone.now()
    # A stale run writes seq 1 again: its batch is refused, the other conversation's is stored.
    results = await asyncio.gather(
        event_store().write_batch(good.pk, [event(good, 1), event(good, 2)], Rows(), now),
        event_store().write_batch(stale.pk, [event(stale, 1)], Rows(), now),
        return_exceptions=True,
    )
    assert shared_statements == [1, 2, 1, 1]  # the stale one's first, then tried together, then each alone
    assert results[0] is None
    assert isinstance(results[1], psycopg.errors.UniqueViolation)
    await good.arefresh_from_db()
    assert good.last_seq == 2
    assert await Event.objects.filter(conversation=good).acount() == 2
    assert await Event.objects.filter(conversation=stale).acount() == 1


async def test_a_batch_without_events_shares_the_round_and_keeps_its_last_seq(
    shared_statements: list[int],
) -> None:
    first, second, third = await new_conversation(), await new_conversation(), await new_conversation()
    now = timezone.now()
    await asyncio.gather(
        event_store().write_batch(first.pk, [event(first, 1)], Rows(), now),
        event_store().write_batch(
            second.pk, [], Rows(messages=[{"conversation_id": second.pk, **message(1, "a", "x")}]), now
        ),
        event_store().write_batch(third.pk, [event(third, 1)], Rows(), now),
    )
    assert shared_statements == [3]
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
        event_store().write_batch(
            turn.pk,
            [event(turn, 1)],
            Rows(conversation={"turns_completed": 1, "heartbeat_at": beat}),
            now,
        ),
        event_store().write_batch(
            final.pk, [event(final, 1), event(final, 2)], Rows(conversation=final_fields), now
        ),
        event_store().write_batch(plain.pk, [event(plain, 1)], Rows(), now),
    )
    assert shared_statements == [3]
    await event_store().write_batch(
        alone.pk, [event(alone, 1), event(alone, 2)], Rows(conversation=final_fields), now
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
        event_store().write_batch(conversation.pk, [event(conversation, 1)], Rows(), now),
        event_store().write_batch(conversation.pk, [event(conversation, 2)], Rows(), now),
    )
    assert shared_statements == [1, 1]  # each on its own
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


def test_an_event_row_written_out_holds_every_column_of_the_model() -> None:
    """`_event_json` writes the row without an encoder: every Event column but the key, each as
    the encoder would have written it (a type with a quote included)."""
    import json
    import uuid

    conversation_id = uuid.uuid4()
    event = {"seq": 7, "type": 'odd "type"', "conversation_id": str(conversation_id)}
    row = json.loads(
        pg_store._event_json(str(conversation_id), event, event_text(event), "2026-01-01T00:00:00+00:00")
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
    text = event_text(event)
    assert json.loads(text) == json.loads(json.dumps(event))
    assert "Grün ✓" in text  # not escaped
    assert " " not in text.replace("Grün ✓", "")  # compact


def test_a_chat_stores_its_new_conversation_running_and_begins_without_a_statement(
    client_with: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/chat runs its exchange at once: the new conversation is inserted already running (its
    start and heartbeat set), and the run begins from it instead of a begin statement."""
    begins: list[object] = []
    begin_run = event_store().begin_run

    async def counted(*args: Any, **kwargs: Any) -> Any:
        begins.append(args[0])
        return await begin_run(*args, **kwargs)

    monkeypatch.setattr(event_store(), "begin_run", counted)
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
