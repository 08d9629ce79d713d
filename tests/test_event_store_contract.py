"""The event store's contract, the same on every backend (`conversations.store`).

Each test runs on the embedded backend's code (the ORM) and, with DATABASE_URL, on the
PostgreSQL backend's statements: a batch and the rows beside it are stored together or not at
all, a batch whose commit went through but whose answer was lost is not stored twice, and a
run resumed after its log broke ends as a run that never broke.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from conversations import store as store_package
from conversations.events import EventLog, EventLogBroken
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from conversations.services import _abegin, conversation_run, conversation_start
from conversations.store import EventStore, Rows
from conversations.store.postgres import PostgresEventStore
from conversations.store.sqlite import SqliteEventStore
from gateway.principal import Principal

pytestmark = pytest.mark.django_db(transaction=True)

PRINCIPAL = Principal(kind="anonymous", permissions=frozenset({"read", "write"}))


@pytest.fixture(params=["orm", "postgres"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> EventStore:
    """The backend under test, made the process's event store for the test."""
    if request.param == "postgres" and not settings.USING_POSTGRES:
        pytest.skip("needs DATABASE_URL (PostgreSQL)")
    backend: EventStore = PostgresEventStore() if request.param == "postgres" else SqliteEventStore()
    monkeypatch.setattr(store_package, "_chosen", backend)
    return backend


def event(conversation: Conversation, seq: int, type: str = "agent_response") -> dict[str, Any]:
    return {"type": type, "conversation_id": str(conversation.pk), "seq": seq, "exchange": 1}


def answer(conversation: Conversation, turn: int, agent_id: str, content: str) -> dict[str, Any]:
    return {
        "conversation_id": conversation.pk,
        "exchange": 1,
        "role": Message.Role.AGENT,
        "agent_id": agent_id,
        "turn": turn,
        "content": content,
    }


async def new_conversation() -> Conversation:
    return await Conversation.objects.acreate(owner="key:1", status="running", exchanges=1)


async def seqs(conversation: Conversation) -> list[int]:
    return [e.seq async for e in Event.objects.filter(conversation=conversation).order_by("seq")]


async def test_a_batch_stores_its_events_rows_and_counters_together(store: EventStore) -> None:
    conversation = await new_conversation()
    beat = timezone.now()
    rows = Rows(
        messages=[answer(conversation, 1, "agent_0", "Blue.")],
        votes=[{"conversation_id": conversation.pk, "exchange": 1, "voter": "agent_0", "choice": "A"}],
        result={"conversation_id": conversation.pk, "exchange": 1, "method": "majority", "reached": True},
        conversation={"turns_completed": 1, "heartbeat_at": beat, "metadata": {"k": [1, None]}},
    )
    await store.write_batch(conversation.pk, [event(conversation, 1), event(conversation, 2)], rows, beat)
    await conversation.arefresh_from_db()
    assert (conversation.last_seq, conversation.turns_completed, conversation.heartbeat_at) == (2, 1, beat)
    assert conversation.metadata == {"k": [1, None]}
    stored = await Message.objects.aget(conversation=conversation)
    # Columns the batch did not give get the model's defaults.
    assert (stored.content, stored.raw_content, stored.repair_calls, stored.cost_usd) == ("Blue.", "", 0, 0.0)
    assert (stored.role, stored.status, stored.cost_estimated) == ("agent", "ok", False)
    vote = await Vote.objects.aget(conversation=conversation)
    assert (vote.choice, vote.confidence, vote.reason) == ("A", None, "")
    result = await ConsensusResult.objects.aget(conversation=conversation)
    assert (result.method, result.reached, result.tallies, result.dissent) == ("majority", True, {}, [])
    assert [e.data async for e in Event.objects.filter(conversation=conversation).order_by("seq")] == [
        event(conversation, 1),
        event(conversation, 2),
    ]


async def test_a_stored_answer_is_kept_and_a_ballot_and_a_result_are_replaced(store: EventStore) -> None:
    conversation = await new_conversation()
    for seq, (content, choice) in enumerate([("first", "A"), ("second", "B")], start=1):
        rows = Rows(
            messages=[answer(conversation, 1, "agent_0", content)],
            votes=[{"conversation_id": conversation.pk, "exchange": 1, "voter": "agent_0", "choice": choice}],
            result={"conversation_id": conversation.pk, "exchange": 1, "method": "m", "winner": choice},
        )
        await store.write_batch(conversation.pk, [event(conversation, seq)], rows, timezone.now())
    assert [m.content async for m in Message.objects.filter(conversation=conversation)] == ["first"]
    assert [v.choice async for v in Vote.objects.filter(conversation=conversation)] == ["B"]
    assert [r.winner async for r in ConsensusResult.objects.filter(conversation=conversation)] == ["B"]


async def test_an_answer_is_never_stored_without_its_event(store: EventStore) -> None:
    """The crash window a resumed run once had to repair: here the batch's event is refused (its
    seq is stored already), and the answer beside it is not stored either."""
    conversation = await new_conversation()
    await store.write_batch(conversation.pk, [event(conversation, 1)], Rows(), timezone.now())
    rows = Rows(messages=[answer(conversation, 1, "agent_0", "lost")])
    with pytest.raises(store.duplicate):
        await store.write_batch(conversation.pk, [event(conversation, 1)], rows, timezone.now())
    assert await Message.objects.filter(conversation=conversation).acount() == 0
    await conversation.arefresh_from_db()
    assert conversation.last_seq == 1


async def test_rows_without_events_leave_the_conversation_s_last_seq_alone(store: EventStore) -> None:
    conversation = await new_conversation()
    await store.write_batch(conversation.pk, [event(conversation, 1)], Rows(), timezone.now())
    rows = Rows(messages=[answer(conversation, 1, "agent_0", "Blue.")])
    await store.write_batch(conversation.pk, [], rows, timezone.now())
    assert [m.content async for m in Message.objects.filter(conversation=conversation)] == ["Blue."]
    await conversation.arefresh_from_db()
    assert conversation.last_seq == 1


def lose_connection(store: EventStore, monkeypatch: pytest.MonkeyPatch, *, after_commit: bool) -> list[int]:
    """The store's next batch meets a lost connection, before its commit or after it (the commit
    went through, its answer never came back). Returns the calls made, by batch size."""
    calls: list[int] = []
    write = store.write_batch

    async def cut_off(conversation_id: uuid.UUID, batch: list[dict[str, Any]], *rest: Any) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            if after_commit:
                await write(conversation_id, batch, *rest)
            raise store.lost[0]("the server closed the connection unexpectedly")
        await write(conversation_id, batch, *rest)

    monkeypatch.setattr(store, "write_batch", cut_off)
    return calls


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
async def test_a_batch_cut_off_by_a_lost_connection_is_stored_once_by_the_retry(
    store: EventStore, monkeypatch: pytest.MonkeyPatch, after_commit: bool
) -> None:
    conversation = await new_conversation()
    log = await EventLog.open(conversation.pk, buffered=True)
    calls = lose_connection(store, monkeypatch, after_commit=after_commit)
    log.stage_message(answer(conversation, 1, "agent_0", "Red."))
    await log.emit("agent_response", exchange=1, agent_id="agent_0", turn=1, content="Red.")
    assert calls == [1, 1]  # tried, then retried
    assert await seqs(conversation) == [1]
    assert [m.content async for m in Message.objects.filter(conversation=conversation)] == ["Red."]
    await log.emit("turn_completed", turn=1)
    await log.flush()
    assert await seqs(conversation) == [1, 2]


async def test_a_broken_log_refuses_rows_staged_after_it_broke(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run behind a log whose batch could not be stored stops at once; it never spins on rows
    it staged after the log broke."""
    conversation = await new_conversation()
    log = await EventLog.open(conversation.pk, buffered=True)

    async def refused(*args: object) -> None:
        raise store.duplicate("refused")

    monkeypatch.setattr(store, "write_batch", refused)
    with pytest.raises(EventLogBroken):
        await log.emit("agent_response", exchange=1, agent_id="agent_1", turn=1, content="Red.")
    log.stage_conversation(turns_completed=1)
    log.stage_message(answer(conversation, 1, "agent_2", "Blue."))
    with pytest.raises(EventLogBroken):
        await log.flush()


def break_once_at(store: EventStore, monkeypatch: pytest.MonkeyPatch, type: str) -> None:
    """The first batch holding an event of this type is refused: the run's log breaks there."""
    write = store.write_batch
    broken: list[bool] = []

    async def write_or_break(conversation_id: uuid.UUID, batch: list[dict[str, Any]], *rest: Any) -> None:
        if not broken and any(e["type"] == type for e in batch):
            broken.append(True)
            raise store.duplicate("refused")
        await write(conversation_id, batch, *rest)

    monkeypatch.setattr(store, "write_batch", write_or_break)


async def stored_answers(conversation: Conversation) -> list[tuple[int, str]]:
    rows = Message.objects.filter(conversation=conversation, role=Message.Role.AGENT)
    return sorted(await sync_to_async(lambda: list(rows.values_list("turn", "agent_id")))())


@pytest.mark.parametrize("breaks_at", ["agent_response", "turn_completed", "conversation_completed"])
async def test_a_run_resumed_after_its_log_broke_ends_as_an_unbroken_run(
    store: EventStore, monkeypatch: pytest.MonkeyPatch, breaks_at: str, thread_connections_closed: None
) -> None:
    conversation, exchange = await conversation_start(
        principal=PRINCIPAL, message="Is a hot dog a sandwich?", num_agents=3, turns=2
    )
    break_once_at(store, monkeypatch, breaks_at)
    with pytest.raises(EventLogBroken):
        await conversation_run(conversation_id=conversation.pk, exchange=exchange)
    assert (await Conversation.objects.aget(pk=conversation.pk)).status == Conversation.Status.RUNNING
    done = await conversation_run(conversation_id=conversation.pk, exchange=exchange)
    assert done.status in (Conversation.Status.COMPLETED, Conversation.Status.NO_CONSENSUS)
    events = [e async for e in Event.objects.filter(conversation=conversation).order_by("seq")]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # no gap
    announced = [(e.data["turn"], e.data["agent_id"]) for e in events if e.type == "agent_response"]
    assert len(announced) == len(set(announced))  # nothing announced twice
    assert (
        sorted(announced)
        == await stored_answers(conversation)
        == [(turn, f"agent_{n}") for turn in (1, 2) for n in range(3)]
    )
    assert events[-1].type == "conversation_completed"
    stored = await Conversation.objects.aget(pk=conversation.pk)
    assert (stored.status, stored.last_seq) == (done.status, events[-1].seq)


async def test_a_run_begins_from_what_is_stored(store: EventStore, thread_connections_closed: None) -> None:
    """begin_run marks the run running and reads the exchange's stored answers, the earlier
    exchanges and the last seq; a finished conversation or a stale exchange begins nothing."""
    first, _ = await conversation_start(principal=PRINCIPAL, message="Tea or coffee?", num_agents=3, turns=1)
    await conversation_run(conversation_id=first.pk, exchange=1)
    conversation, exchange = await conversation_start(
        principal=PRINCIPAL, message="And at night?", conversation_id=first.pk, num_agents=3, turns=2
    )
    stored: list[dict[str, Any]] = [
        dict(agent_id="agent_0", content="Tea.", raw_content="POSITION: Tea", position="Tea", confidence=0.8),
        dict(agent_id="agent_1", content="POSITION: Coffee\nCONFIDENCE: 0.6"),
        dict(agent_id="agent_2", status="failed", error="timeout: slow"),
    ]
    for fields in stored:
        await Message.objects.acreate(conversation=conversation, exchange=2, role="agent", turn=1, **fields)
    begun = await _abegin(conversation.pk, exchange)
    assert begun.question == "And at night?"
    assert [q for q, _ in begun.history] == ["Tea or coffee?"]
    assert sorted(begun.prior[1]) == ["agent_0", "agent_1", "agent_2"]
    assert begun.prior[1]["agent_0"].proposal is not None
    assert not begun.prior[1]["agent_2"].ok
    assert begun.last_seq == (await Conversation.objects.aget(pk=first.pk)).last_seq
    row = await Conversation.objects.aget(pk=conversation.pk)
    assert row.status == begun.conversation.status == "running"
    for f in Conversation._meta.concrete_fields:
        if f.attname not in ("updated_at",):
            assert getattr(begun.conversation, f.attname) == getattr(row, f.attname), f.attname
    assert await store.begin_run(conversation.pk, exchange - 1, timezone.now()) is None  # stale
    await Conversation.objects.filter(pk=conversation.pk).aupdate(status="completed")
    assert await store.begin_run(conversation.pk, exchange, timezone.now()) is None  # finished


async def test_a_new_conversation_starts_unless_its_key_has_a_quota(store: EventStore, make_key: Any) -> None:
    plain, _ = await sync_to_async(make_key)(["read", "write"])
    quota, _ = await sync_to_async(make_key)(["read", "write"], daily_quota=100_000)
    for key, started in ((plain, True), (quota, False)):
        conversation = Conversation(api_key_id=key.pk, exchanges=1, title="Tea?", status="running")
        question = {"conversation_id": conversation.pk, "exchange": 1, "role": "user", "content": "Tea?"}
        assert await store.start_conversation(conversation, question) is started
        assert await Conversation.objects.filter(pk=conversation.pk).aexists() is started
        messages = Message.objects.filter(conversation_id=conversation.pk)
        assert [m.content async for m in messages] == (["Tea?"] if started else [])


async def test_an_exchange_s_rows_read_for_the_chat_body(
    store: EventStore, thread_connections_closed: None
) -> None:
    conversation, exchange = await conversation_start(
        principal=PRINCIPAL, message="Tabs or spaces?", num_agents=3, turns=2
    )
    await conversation_run(conversation_id=conversation.pk, exchange=exchange)
    await Message.objects.acreate(
        conversation=conversation, exchange=exchange, role="agent", agent_id="agent_9", turn=1,
        status="failed", error="timeout: slow", model="m",
    )  # fmt: skip
    messages, result, votes = await store.exchange_rows(conversation.pk, exchange)
    assert [(m["turn"], m["agent_id"]) for m in messages] == sorted(
        [(t, f"agent_{n}") for t in (1, 2) for n in range(3)] + [(1, "agent_9")]
    )
    assert set(messages[0]) == set(store_package.CHAT_MESSAGE_FIELDS)
    assert result is not None
    assert set(result) == set(store_package.CHAT_RESULT_FIELDS)
    assert [v["voter"] for v in votes] == sorted(v["voter"] for v in votes)
    assert len(votes) == 3
    assert await store.exchange_rows(conversation.pk, exchange + 1) == ([], None, [])
