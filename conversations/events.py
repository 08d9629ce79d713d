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
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg_pool
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings
from django.db import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    transaction,
)
from django.db.models import Max
from django.utils import timezone
from redis.exceptions import RedisError, ResponseError
from redis.utils import str_if_bytes

from conversations import store
from conversations.models import Conversation, Event
from conversations.redis_options import reconnecting
from conversations.rounds import Rounds

logger = logging.getLogger("polyagents.events")

T = TypeVar("T")

# How long a batch of events is retried while the database is away (a restart takes seconds).
STORE_RETRY_SECONDS = 10.0

# One asyncio Redis client per event loop (a client is bound to the loop that made it).
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def group_name(conversation_id: uuid.UUID | str) -> str:
    return f"conv.{conversation_id}"


def stream_key(conversation_id: uuid.UUID | str) -> str:
    """The Redis Stream holding a conversation's events (REDIS_URL deployments)."""
    return f"{settings.REDIS_KEY_PREFIX}:stream:{conversation_id}"


def redis_client() -> aioredis.Redis | None:
    """The Redis client of the running event loop, or None without REDIS_URL."""
    if not settings.REDIS_URL:
        return None
    loop = asyncio.get_running_loop()
    cached = _clients.get(loop)
    if cached is not None and cached[0] == settings.REDIS_URL:
        return cached[1]
    client = aioredis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        **reconnecting(),
    )
    _clients[loop] = (settings.REDIS_URL, client)
    return client


def _live_message(event: dict[str, Any], text: str) -> dict[str, Any]:
    # `text` is the event as every follower receives it, serialised once, not per socket.
    return {"type": "conversation.event", "event": event, "text": text}


def _redis_group_channel(layer: Any, conversation_id: str) -> str | None:
    """The pub/sub channel that channels_redis's layer PUBLISHes a group_send of this
    conversation to, when that layer's only Redis is REDIS_URL's (so the event log can publish
    in its own pipeline); None for any other layer."""
    if not isinstance(layer, RedisPubSubChannelLayer):
        return None
    loop_layer = layer._get_layer()
    shards = loop_layer._shards
    if len(shards) != 1 or shards[0].host.get("address") != settings.REDIS_URL:
        return None
    return str(loop_layer._get_group_channel_name(group_name(conversation_id)))


async def _send(batch: list[dict[str, Any]], texts: list[str]) -> None:
    """Append stored events to the conversation's Redis Stream and publish them live.

    With REDIS_URL and the Redis pub/sub layer, one command does both, in order (`_SEND`):
    XADD under ids `<seq>-0` (trimmed to STREAM_MAXLEN, expiring after STREAM_TTL), then the
    layer's own PUBLISH of each event (the message a `group_send` would publish); the batches
    of other conversations ready at the same time share its round trip (`_send_round`).
    Otherwise the stream append and the layer's `group_send` go separately, as before.
    """
    client = redis_client()
    if not batch:
        return
    conversation_id = batch[0]["conversation_id"]
    layer = get_channel_layer()
    channel = _redis_group_channel(layer, conversation_id) if client is not None else None
    if client is None or channel is None:
        await _append_to_stream(batch, texts)
        for event, text in zip(batch, texts, strict=True):
            await _publish(event, text)
        return
    rounds = _rounds.get(client)
    if rounds is None:
        rounds = _rounds[client] = Rounds(_send_round)
    failed = await rounds.submit((client, layer, channel, batch, texts))
    if failed:
        logger.warning(
            "events not all appended to the Redis Stream or published; replay serves them from the database",
            extra={"conversation_id": conversation_id, "seq": batch[0]["seq"], "error": repr(failed[0])},
        )


# A round's item: the client, the channel layer, its pub/sub channel, the batch, its texts.
_Send = tuple[aioredis.Redis, Any, str, list[dict[str, Any]], list[str]]


# One batch's stream append and live publication as one command (a Lua script), in order:
# KEYS[1] the stream; ARGV: MAXLEN, TTL, the pub/sub channel, then per event its stream id,
# its text and its layer message. Each command runs under pcall, so a refused XADD (an id the
# stream already holds: a batch sent again) stops neither the others nor the publication, as
# in a pipeline; the script returns the refusals' messages. One command instead of 2n + 1
# cuts the client's CPU per batch by about a third (`bench/parts.py`, docs/scaling.md) for
# about 13 us more of Redis's; the script's text is sent with each call (EVAL), so a restarted
# Redis needs no reloading.
_SEND = """
local refused = {}
for i = 4, #ARGV, 3 do
  local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[i], 'e', ARGV[i + 1])
  if type(added) == 'table' and added.err then refused[#refused + 1] = added.err end
end
redis.pcall('EXPIRE', KEYS[1], ARGV[2])
for i = 6, #ARGV, 3 do
  redis.pcall('PUBLISH', ARGV[3], ARGV[i])
end
return refused
"""


async def _send_round(sends: list[_Send]) -> list[list[Any] | BaseException]:
    """Every batch of the round appended to its stream and published, one command each (in one
    pipeline when the round has several); for each batch, its errors."""
    client = sends[0][0]  # one client per round: the rounds are kept per client
    config = settings.CONFIG  # read once per round: settings is a lazy proxy
    commands = []
    for _, layer, channel, batch, texts in sends:
        args: list[Any] = [config.STREAM_MAXLEN, config.STREAM_TTL, channel]
        for event, text in zip(batch, texts, strict=True):
            args += (f"{event['seq']}-0", text, layer.serialize(_live_message(event, text)))
        commands.append(("EVAL", _SEND, 1, stream_key(batch[0]["conversation_id"]), *args))
    results: list[Any]
    try:
        if len(commands) == 1:  # a batch alone (an idle process): no pipeline to set up
            results = [await client.execute_command(*commands[0])]
        else:
            async with client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                results = await pipe.execute(raise_on_error=False)
    except (RedisError, OSError) as exc:  # each batch reports it (a warning), none raises it
        return [[exc] for _ in sends]
    return [
        [result] if isinstance(result, Exception) else [ResponseError(str_if_bytes(r)) for r in result]
        for result in results
    ]


# Per Redis client (so per event loop); weakly, so a client's rounds go with it.
_rounds: weakref.WeakKeyDictionary[aioredis.Redis, Rounds[_Send, list[Any]]] = weakref.WeakKeyDictionary()


def _queue_appends(pipe: Any, key: str, batch: list[dict[str, Any]], texts: list[str]) -> None:
    config = settings.CONFIG  # read once per batch: settings is a lazy proxy
    for event, text in zip(batch, texts, strict=True):
        pipe.xadd(key, {"e": text}, id=f"{event['seq']}-0", maxlen=config.STREAM_MAXLEN, approximate=True)
    pipe.expire(key, config.STREAM_TTL)


async def _append_to_stream(batch: list[dict[str, Any]], texts: list[str]) -> None:
    """XADD events under ids `<seq>-0`, trimmed to STREAM_MAXLEN and expiring after STREAM_TTL."""
    client = redis_client()
    if client is None or not batch:
        return
    try:
        async with client.pipeline(transaction=False) as pipe:
            _queue_appends(pipe, stream_key(batch[0]["conversation_id"]), batch, texts)
            await pipe.execute()
    except (RedisError, OSError) as exc:
        logger.warning(
            "events not appended to the Redis Stream; replay will serve them from the database",
            extra={"conversation_id": batch[0]["conversation_id"], "seq": batch[0]["seq"], "error": str(exc)},
        )


async def _publish(event: dict[str, Any], text: str) -> None:
    """Push the event to the live WebSocket followers of its conversation."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group_name(event["conversation_id"]), _live_message(event, text))
    except (RedisError, OSError) as exc:
        logger.warning(
            "event not published live; clients will get it by replay",
            extra={"conversation_id": event["conversation_id"], "seq": event["seq"], "error": str(exc)},
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


async def in_pool_thread(fn: Callable[..., T], *args: Any) -> T:
    """Blocking ORM work off the event loop.

    On PostgreSQL any pool thread takes it, each with its own pooled connection, handed back
    when the work is done (pool threads never hold one), so many conversations or handshakes
    of one process are served in parallel instead of queueing behind Django's one
    thread-sensitive executor. SQLite keeps that one thread (a single writer).
    """

    def call() -> T:
        try:
            return fn(*args)
        finally:
            if settings.USING_POSTGRES:
                connection.close()

    return await sync_to_async(call, thread_sensitive=not settings.USING_POSTGRES)()


def _store_sync(conversation_id: uuid.UUID, batch: list[dict[str, Any]], now: datetime) -> None:
    with transaction.atomic():
        Event.objects.bulk_create(
            Event(
                conversation_id=conversation_id,
                seq=event["seq"],
                type=event["type"],
                data=event,
                created_at=now,
            )
            for event in batch
        )
        Conversation.objects.filter(pk=conversation_id).update(last_seq=batch[-1]["seq"])


def _stored_sync(conversation_id: uuid.UUID, batch: list[dict[str, Any]]) -> bool:
    """Whether every event of the batch is stored (an earlier try committed, its answer was lost)."""
    seqs = [event["seq"] for event in batch]
    return Event.objects.filter(conversation_id=conversation_id, seq__in=seqs).count() == len(seqs)


async def _store(conversation_id: uuid.UUID, batch: list[dict[str, Any]], now: datetime) -> None:
    """Write the Event rows of a batch and the conversation's last_seq, in one transaction.

    It runs `in_pool_thread`: on PostgreSQL many conversations of one process store their
    events in parallel.

    A lost connection (a database restart) is retried with back-off until STORE_RETRY_SECONDS
    have passed (a try may itself wait for the pool's timeout): the pool hands out a checked
    connection each time. After that the caller's run stops and is resumed by its retry.
    """

    async def write() -> None:
        await in_pool_thread(_store_sync, conversation_id, batch, now)

    async def reset() -> None:
        if not settings.USING_POSTGRES:  # pool threads hand their connection back after each try
            await sync_to_async(close_old_connections)()

    await _retrying(
        write,
        conversation_id,
        batch,
        reset=reset,
        lost=(OperationalError, InterfaceError),
        duplicate=IntegrityError,
    )


async def _store_pipelined(
    conversation_id: uuid.UUID,
    batch: list[dict[str, Any]],
    rows: store.Rows,
    now: datetime,
    texts: list[str],
) -> None:
    """PostgreSQL: the batch's events and staged rows in one pipelined transaction, retried like `_store`."""

    async def write() -> None:
        await store.write_batches(conversation_id, batch, rows, now, texts)

    async def reset() -> None:
        await store.discard_pool()  # the next try opens a fresh pool

    await _retrying(
        write,
        conversation_id,
        batch,
        reset=reset,
        lost=(psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout),
        duplicate=psycopg.IntegrityError,
    )


async def _retrying(
    write: Callable[[], Awaitable[None]],
    conversation_id: uuid.UUID,
    batch: list[dict[str, Any]],
    *,
    reset: Callable[[], Awaitable[None]],
    lost: tuple[type[BaseException], ...],
    duplicate: type[BaseException],
) -> None:
    """Run a batch write; a lost connection (a database restart) is retried with back-off until
    STORE_RETRY_SECONDS have passed. A retry that finds the batch already stored (the commit
    went through, its answer was lost) is a success."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + STORE_RETRY_SECONDS
    delay = 0.25
    retried = False
    while True:
        try:
            await write()
            return
        except duplicate:
            if retried and batch:
                stored: bool = await in_pool_thread(_stored_sync, conversation_id, batch)
                if stored:
                    return
            raise
        except lost as exc:
            if loop.time() >= give_up:
                raise
            logger.warning(
                "events not stored yet; retrying",
                extra={
                    "conversation_id": str(conversation_id),
                    "seq": batch[0]["seq"] if batch else None,
                    "error": repr(exc),
                },
            )
            await reset()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            retried = True


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
    agent's response halves a conversation's batches at zero latency, but the next turn's calls
    then take the CPU before the responses are published: `bench/live.py`'s p99 rose two- to
    threefold, docs/scaling.md phase J.) Unless nobody watches: a run that knows no one follows
    it live (`watched` false: a /chat round without a WebSocket subscriber) does not wait for
    its responses either, as publishing them sooner serves no one; each goes with its message
    row in the writer's next batch, and a resumed run asks again an agent whose answer was not
    stored (docs/scaling.md, phase K). If the process dies,
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
        # On PostgreSQL the rows an event stands beside are staged here and written in the same
        # pipelined transaction as the event (conversations.store); SQLite keeps the ORM path.
        self.pipelined = store.pipelined()
        self._rows = store.Rows()
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
        """Write this Message row (fields by attname) with the next batch (pipelined logs only)."""
        self._rows.messages.append({"conversation_id": self.conversation_id, **fields})

    def stage_vote(self, fields: dict[str, Any]) -> None:
        """Insert or replace this ballot with the next batch (pipelined logs only)."""
        self._rows.votes.append({"conversation_id": self.conversation_id, **fields})

    def stage_result(self, fields: dict[str, Any]) -> None:
        """Insert or replace an exchange's consensus result with the next batch (pipelined logs only)."""
        self._rows.result = {"conversation_id": self.conversation_id, **fields}

    def stage_conversation(self, **fields: Any) -> None:
        """Set these Conversation fields with the next batch (pipelined logs only)."""
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
                rows, self._rows = self._rows, store.Rows()
                texts = [store.event_text(event) for event in batch]  # once: stored, streamed, sent
                try:
                    if self.pipelined:
                        await _store_pipelined(self.conversation_id, batch, rows, timezone.now(), texts)
                    elif batch:
                        await _store(self.conversation_id, batch, timezone.now())
                except Exception as exc:
                    # Never publish what is not stored, nor store anything after it (no gap).
                    self._broken = exc
                    self._pending, self._rows = [], store.Rows()
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
