"""The event log of a conversation: store first, then publish.

Every event gets the next `seq` of its conversation and is written as an `Event` row;
only then is it appended to the conversation's Redis Stream (when REDIS_URL is set) and
pushed to the conversation's Channels group. One `EventLog` instance belongs to the
single run that drives a conversation, so `seq` is assigned in order without a
database round trip. Redis is an accelerator and a fan-out path, never the source of
truth: if it is down the event is still stored and replay serves it from the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.db.models import Max
from django.utils import timezone
from redis.exceptions import RedisError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from conversations.models import Event
from conversations.redis_options import reconnecting
from conversations.rounds import Rounds
from conversations.store import Rows, event_store, event_text
from conversations.threads import in_pool_thread
from loopstate import PerLoop

logger = logging.getLogger("polyagents.events")

# How long a batch of events is retried while the database is away (a restart takes seconds).
STORE_RETRY_SECONDS = 10.0

__all__ = ["EventLog", "EventLogBroken", "has_watchers", "in_pool_thread", "read_events", "redis_client"]


class _LoopRedis:
    """The running loop's Redis client (a client is bound to the loop that made it), the URL it
    was made for, and the rounds of batches sent through it."""

    def __init__(self) -> None:
        self.url = ""
        self.client: aioredis.Redis | None = None
        self.rounds: Rounds[_Append, list[Any]] = Rounds(_append_round)


_redis: PerLoop[_LoopRedis] = PerLoop(_LoopRedis)


def group_name(conversation_id: uuid.UUID | str) -> str:
    return f"conv.{conversation_id}"


def stream_key(conversation_id: uuid.UUID | str) -> str:
    """The Redis Stream holding a conversation's events (REDIS_URL deployments)."""
    return f"{settings.REDIS_KEY_PREFIX}:stream:{conversation_id}"


def redis_client() -> aioredis.Redis | None:
    """The Redis client of the running event loop, or None without REDIS_URL."""
    if not settings.REDIS_URL:
        return None
    slot = _redis.get()
    if slot.client is None or slot.url != settings.REDIS_URL:
        slot.url = settings.REDIS_URL
        slot.client = aioredis.Redis.from_url(
            settings.REDIS_URL,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
            **reconnecting(),
        )
    return slot.client


def _live_message(batch: list[dict[str, Any]], texts: list[str]) -> dict[str, Any]:
    # `texts` are the events as every follower receives them, serialised once, not per socket.
    return {"type": "conversation.events", "events": batch, "texts": texts}


async def _send(batch: list[dict[str, Any]], texts: list[str]) -> None:
    """Append stored events to the conversation's Redis Stream, then publish them live.

    The appends of the batches of other conversations ready at the same time share one
    pipeline (`_append_round`); the batch is then published as one message through the
    channel layer's `group_send`.
    """
    if not batch:
        return
    client = redis_client()
    if client is not None:
        failed = await _redis.get().rounds.submit((client, batch, texts))
        if failed:
            logger.warning(
                "events not appended to the Redis Stream; replay will serve them from the database",
                extra={
                    "conversation_id": batch[0]["conversation_id"],
                    "seq": batch[0]["seq"],
                    "error": repr(failed[0]),
                },
            )
    await _publish(batch, texts)


# A round's item: the client, the batch and its texts.
_Append = tuple[aioredis.Redis, list[dict[str, Any]], list[str]]


def _queue_appends(pipe: Any, key: str, batch: list[dict[str, Any]], texts: list[str]) -> None:
    """XADD events under ids `<seq>-0`, trimmed to STREAM_MAXLEN and expiring after STREAM_TTL."""
    config = settings.CONFIG  # read once per batch: settings is a lazy proxy
    for event, text in zip(batch, texts, strict=True):
        pipe.xadd(key, {"e": text}, id=f"{event['seq']}-0", maxlen=config.STREAM_MAXLEN, approximate=True)
    pipe.expire(key, config.STREAM_TTL)


async def _append_round(appends: list[_Append]) -> list[list[Any] | BaseException]:
    """Every batch of the round appended to its stream, in one pipeline; for each batch, its
    errors (a refused XADD: an id the stream holds already, a batch sent again)."""
    client = appends[0][0]  # one client per round: the rounds are kept per loop, like the client
    try:
        async with client.pipeline(transaction=False) as pipe:
            for _, batch, texts in appends:
                _queue_appends(pipe, stream_key(batch[0]["conversation_id"]), batch, texts)
            results = await pipe.execute(raise_on_error=False)
    except (RedisError, OSError) as exc:  # each batch reports it (a warning), none raises it
        return [[exc] for _ in appends]
    outcomes: list[list[Any] | BaseException] = []
    for _, batch, _texts in appends:
        mine, results = results[: len(batch) + 1], results[len(batch) + 1 :]
        outcomes.append([r for r in mine if isinstance(r, Exception)])
    return outcomes


async def _publish(batch: list[dict[str, Any]], texts: list[str]) -> None:
    """Push a batch of events to the live WebSocket followers of its conversation."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group_name(batch[0]["conversation_id"]), _live_message(batch, texts))
    except (RedisError, OSError) as exc:
        logger.warning(
            "events not published live; clients will get them by replay",
            extra={"conversation_id": batch[0]["conversation_id"], "seq": batch[0]["seq"], "error": str(exc)},
        )


async def has_watchers(conversation_id: uuid.UUID | str) -> bool:
    """Whether a live WebSocket follows the conversation now (a /chat run streams only then).

    With the in-memory layer: the group has a member in this process. With the Redis pub/sub
    layer: the group's pub/sub channel has a subscriber (`PUBSUB NUMSUB`), in any web process.
    An unknown layer, or Redis not answering, counts as watched: streaming is the safe default.
    """
    layer = get_channel_layer()
    if layer is None:
        return False
    group = group_name(conversation_id)
    if isinstance(layer, InMemoryChannelLayer):
        return bool(layer.groups.get(group))
    client = redis_client()
    channel_of = getattr(layer, "_get_group_channel_name", None)  # channels_redis's group channel
    if client is None or channel_of is None:
        return True
    try:
        counts = await client.pubsub_numsub(channel_of(group))
    except (RedisError, OSError) as exc:
        logger.warning("subscriber count unknown; streaming", extra={"error": str(exc)})
        return True
    return any(int(n) > 0 for _channel, n in counts)


async def _write(
    conversation_id: uuid.UUID, batch: list[dict[str, Any]], rows: Rows, texts: list[str]
) -> None:
    """Store a batch and its rows (`EventStore.write_batch`).

    A lost connection (a database restart) is retried with back-off until STORE_RETRY_SECONDS
    have passed; the store drops its connections before each retry. A retry that finds the
    batch already stored (the commit went through, its answer was lost) is a success. After
    that the caller's run stops and is resumed later. The first try runs before tenacity is
    set up: almost every batch needs no second.
    """
    store = event_store()
    try:
        await store.write_batch(conversation_id, batch, rows, timezone.now(), texts)
        return
    except store.lost as exc:
        await _before_retry(conversation_id, batch, exc)

    async def before_sleep(state: RetryCallState) -> None:
        await _before_retry(conversation_id, batch, state.outcome.exception() if state.outcome else None)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(store.lost),
        stop=stop_after_delay(STORE_RETRY_SECONDS),
        wait=wait_exponential(multiplier=0.25, max=2.0),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await store.write_batch(conversation_id, batch, rows, timezone.now(), texts)
    except store.duplicate:
        if not (batch and await store.batch_stored(conversation_id, batch)):
            raise


async def _before_retry(conversation_id: uuid.UUID, batch: list[dict[str, Any]], error: Any) -> None:
    seq = batch[0]["seq"] if batch else None
    logger.warning(
        "events not stored yet; retrying",
        extra={"conversation_id": str(conversation_id), "seq": seq, "error": repr(error)},
    )
    await event_store().reset()


class EventLogBroken(Exception):
    """Events of the log could not be stored: the run must stop (and be resumed later)."""


class EventLog:
    """Assigns `seq`, stores, appends to the stream and publishes, strictly in `seq` order.

    By default `emit` returns once its event is stored and sent. A `buffered` log (the one a
    conversation run writes through) does not wait for deltas, for a run's and a turn's
    markers (`conversation_started`, `turn_started`, `consensus_update`, `turn_completed`),
    for ballots (`vote`) nor for `consensus_reached`: a single writer task stores and sends
    them in batches, at once when it is idle (after the tasks already ready have run, so what
    they emit together shares the batch), so streaming agents never wait on I/O per
    chunk, a run's first calls start without waiting for a write, a panel's ballots go in one
    batch instead of one round trip each, and a decision goes in the batch of its terminal
    event. Every other event waits for its batch, because it stands beside a stored row (an
    agent's message) that a resumed run reuses without emitting again. (Not waiting for an
    agent's response would let the next turn's calls take the CPU before the responses are
    published, delaying them for live followers: `bench/live.py`'s p99.) Unless nobody
    watches: a run that knows no one follows it live (`watched` false: a /chat round without a
    WebSocket subscriber) does not wait for its responses either, as publishing them sooner
    serves no one; each goes with its message row in the writer's next batch, and a resumed
    run asks again an agent whose answer was not stored. If the process dies,
    only events of the buffered kinds written in its last milliseconds can be lost, and none
    of them is needed to resume: each delta is superseded by its `agent_response`, a resumed
    run announces itself and its turn again, `consensus_update` is an interim figure, a
    turn's `turn_completed` (and the counter staged with it) is superseded by the next one
    and by the terminal event, and a resumed run votes and decides again (ballots and the
    result are upserted, never reused), before its terminal event, which waits for every
    earlier one.
    """

    BUFFERED_TYPES = frozenset(
        {
            "agent_delta",
            "synthesis_delta",
            "conversation_started",
            "turn_started",
            "consensus_update",
            "turn_completed",
            "vote",
            "consensus_reached",
        }
    )

    # Buffered too while nobody watches the run live.
    UNWATCHED_BUFFERED_TYPES = frozenset({"agent_response"})

    def __init__(self, conversation_id: uuid.UUID, last_seq: int = 0, *, buffered: bool = False) -> None:
        self.conversation_id = conversation_id
        self._id_text = str(conversation_id)  # in every event
        self.last_seq = last_seq
        self.buffered = buffered
        # False while the run knows that no one follows it live (set by the run before a round).
        self.watched = True
        self._pending: list[dict[str, Any]] = []
        # The rows the next batch's events stand beside, written in the same transaction.
        self._rows = Rows()
        self._writer: asyncio.Task[None] | None = None
        # Set when a batch could not be stored: later events are refused, so the stored log
        # never has a gap (a resumed run continues after the last stored seq).
        self._broken: BaseException | None = None
        # One writer at a time: a follower must never see seq N+1 before N is stored.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, conversation_id: uuid.UUID, *, buffered: bool = False) -> EventLog:
        """Continue the log of a conversation after its last stored event."""
        last_seq = await sync_to_async(cls.last_stored_seq)(conversation_id)
        return cls(conversation_id, last_seq, buffered=buffered)

    @staticmethod
    def last_stored_seq(conversation_id: uuid.UUID) -> int:
        """The seq a log continues after (blocking: for ORM work already off the event loop)."""
        result = Event.objects.filter(conversation_id=conversation_id).aggregate(m=Max("seq"))
        return int(result["m"] or 0)

    def stage_message(self, fields: dict[str, Any]) -> None:
        """Write this Message row (fields by attname) with the next batch."""
        self._rows.messages.append({"conversation_id": self.conversation_id, **fields})

    def stage_vote(self, fields: dict[str, Any]) -> None:
        """Insert or replace this ballot with the next batch."""
        self._rows.votes.append({"conversation_id": self.conversation_id, **fields})

    def stage_result(self, fields: dict[str, Any]) -> None:
        """Insert or replace an exchange's consensus result with the next batch."""
        self._rows.result = {"conversation_id": self.conversation_id, **fields}

    def stage_conversation(self, **fields: Any) -> None:
        """Set these Conversation fields with the next batch."""
        self._rows.conversation.update(fields)

    async def emit(self, type: str, **data: Any) -> dict[str, Any]:
        """Queue the event under the next seq; unless buffered, wait until it is stored and sent."""
        self._raise_if_broken()
        self.last_seq += 1
        now = timezone.now()
        event = {
            "type": type,
            "conversation_id": self._id_text,
            "seq": self.last_seq,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            **data,
        }
        # Epoch seconds at emit time: lets clients (and bench/stream.py) measure delivery latency.
        event.setdefault("emitted_at", time.time())
        self._pending.append(event)
        if not self._buffers(type):
            await self.flush()
        elif self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain(gather=True))
        return event

    def _buffers(self, type: str) -> bool:
        """Whether `emit` returns before an event of this type is stored and sent."""
        if not self.buffered:
            return False
        return type in self.BUFFERED_TYPES or (not self.watched and type in self.UNWATCHED_BUFFERED_TYPES)

    async def flush(self) -> None:
        """Wait until every event emitted so far is stored, appended and published."""
        while self._pending or self._rows or (self._writer is not None and not self._writer.done()):
            # A broken log stores nothing more: rows staged after it broke must not keep us here.
            self._raise_if_broken()
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._drain())
            await asyncio.shield(self._writer)
        self._raise_if_broken()

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise EventLogBroken(f"events of {self.conversation_id} not stored: {self._broken!r}")

    async def _drain(self, gather: bool = False) -> None:
        if gather:
            # Started by a buffered event: let the tasks already ready run first, so what they
            # emit at once goes in this batch (a run's `conversation_started` and its first
            # `turn_started`; a panel's ballots and the decision after them).
            await asyncio.sleep(0)
        async with self._lock:
            while (self._pending or self._rows) and self._broken is None:
                batch, self._pending = self._pending, []
                rows, self._rows = self._rows, Rows()
                texts = [event_text(event) for event in batch]  # once: stored, streamed, sent
                try:
                    await _write(self.conversation_id, batch, rows, texts)
                except Exception as exc:
                    # Never publish what is not stored, nor store anything after it (no gap).
                    self._broken = exc
                    self._pending, self._rows = [], Rows()
                    logger.exception(
                        "events not stored; the event log stops",
                        extra={
                            "conversation_id": str(self.conversation_id),
                            "seqs": [e["seq"] for e in batch],
                            "rows": len(rows.messages) + len(rows.votes) + bool(rows.result),
                        },
                    )
                    return
                await _send(batch, texts)


async def _read_stream(conversation_id: uuid.UUID | str, after: int) -> list[dict[str, Any]] | None:
    """Events with seq > after from the Redis Stream, or None when the stream cannot be trusted."""
    client = redis_client()
    if client is None:
        return None
    try:
        entries = await client.xrange(stream_key(conversation_id), min=f"{after + 1}-0", max="+")
    except (RedisError, OSError) as exc:
        logger.warning("Redis Stream unreadable; replaying from the database", extra={"error": str(exc)})
        return None
    events = [orjson.loads(fields[b"e"]) for _id, fields in entries or [] if fields]
    # Complete only if it starts right after `after` with no gap (trimmed, expired or missed writes).
    expected = after + 1
    for event in events:
        if event["seq"] != expected:
            return None
        expected += 1
    return events


async def _read_database(conversation_id: uuid.UUID | str, after: int) -> list[dict[str, Any]]:
    rows = Event.objects.filter(conversation_id=conversation_id, seq__gt=after).order_by("seq")
    return [row.data async for row in rows.only("data")]


async def read_events(conversation_id: uuid.UUID | str, after: int = 0) -> list[dict[str, Any]]:
    """Every stored event of a conversation with seq > after, in order.

    Served from the Redis Stream when it holds a gap-free run from `after`; whatever the
    stream lacks at the tail (written while Redis was away) is read from the database.
    """
    events = await _read_stream(conversation_id, after)
    if not events:
        return await _read_database(conversation_id, after)
    tail = await _read_database(conversation_id, events[-1]["seq"])
    return events + tail
