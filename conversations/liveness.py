"""One heartbeat per process for all the conversations it runs, and cancellation pushed to them.

Each event loop that runs conversations has one `Pulse`. Every HEARTBEAT_SECONDS it saves
`heartbeat_at` of all its running conversations in one UPDATE and, in the same function, reads
which of them were asked to stop: two statements per process per beat, however many runs it
drives (it was two per conversation). The stale sweep (streaming.jobs) reads `heartbeat_at`.

A cancel request sets `cancel_requested` and is then pushed: to the runs of this process at once,
and, with REDIS_URL, over a Redis pub/sub channel that every process running conversations
listens to while it has runs. The flag read at each beat is the fallback when Redis is away or
a push is missed, so a cancel is never lost, only slower (one beat).

`keep_running` and `retrying` are the loops that must outlive errors (this module's, the
recovery sweeps', the worker's): tenacity, capped exponential back-off with full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from conversations.events import in_pool_thread, redis_client
from conversations.models import Conversation
from loopstate import PerLoop

logger = logging.getLogger("polyagents.conversations")

HEARTBEAT_SECONDS = 2.0
# Beats without runs before a pulse stops its tasks: a process that runs conversations one
# after another keeps one Redis subscription instead of subscribing again for each.
IDLE_BEATS = 15

_pulses: PerLoop[Pulse] = PerLoop(lambda: Pulse(asyncio.get_running_loop()))


Errors = type[BaseException] | tuple[type[BaseException], ...]


def retrying(what: str, *, errors: Errors = Exception, max_wait: float = 5.0) -> AsyncRetrying:
    """Retry on `errors` until it succeeds (or is cancelled), `max_wait` seconds apart at most.

    Each failure is logged as "{what} failed; retrying"; the first wait is at most 0.5 s.
    """

    def log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            f"{what} failed; retrying", extra={"error": repr(error), "failures": state.attempt_number}
        )

    return AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_random_exponential(multiplier=0.5, max=max_wait),
        before_sleep=log,
        reraise=True,
    )


async def keep_running(what: str, step: Callable[[], Awaitable[Any]], interval: float) -> None:
    """Run `step` every `interval` seconds until cancelled; a failing step is tried again sooner."""
    while True:
        async for attempt in retrying(what):
            with attempt:
                await step()
        await asyncio.sleep(interval)


def cancel_channel() -> str:
    return f"{settings.REDIS_KEY_PREFIX}:cancel"


def _beat_sync(ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Save the heartbeat of these conversations; return those whose cancel was requested."""
    Conversation.objects.filter(pk__in=ids).update(heartbeat_at=timezone.now())
    flagged = Conversation.objects.filter(pk__in=ids, cancel_requested=True)
    return list(flagged.values_list("pk", flat=True))


class Pulse:
    """The heartbeat and cancel listener of one event loop's running conversations."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.runs: dict[uuid.UUID, asyncio.Task[Any]] = {}
        self._beating: asyncio.Task[None] | None = None
        self._listening: asyncio.Task[None] | None = None

    def add(self, conversation_id: uuid.UUID, run: asyncio.Task[Any]) -> None:
        self.runs[conversation_id] = run
        if self._beating is None or self._beating.done():
            self._beating = self.loop.create_task(self._beat_forever())
        if settings.REDIS_URL and (self._listening is None or self._listening.done()):
            self._listening = self.loop.create_task(self._listen())

    def discard(self, conversation_id: uuid.UUID, run: asyncio.Task[Any]) -> None:
        if self.runs.get(conversation_id) is run:
            del self.runs[conversation_id]

    def _stop(self) -> None:
        listening, self._listening, self._beating = self._listening, None, None
        if listening is not None:
            listening.cancel()

    def cancel(self, conversation_id: uuid.UUID) -> bool:
        """Cancel the run of this conversation if this loop drives it (call from the loop)."""
        run = self.runs.get(conversation_id)
        if run is None or run.done():
            return False
        run.cancel()
        return True

    async def beat(self) -> None:
        """One beat: save every run's heartbeat, cancel the runs whose cancel was requested.

        A failed beat (the database is away) is logged and tried again at the next one: the
        heartbeat proves that the runs are alive, so it must outlive a lost connection.
        """
        ids = [cid for cid, run in self.runs.items() if not run.done()]
        if not ids:
            return
        try:
            flagged = await in_pool_thread(_beat_sync, ids)
        except DatabaseError as exc:
            logger.warning("heartbeat not saved", extra={"conversations": len(ids), "error": repr(exc)})
            await sync_to_async(close_old_connections)()
            return
        for cid in flagged:
            self.cancel(cid)

    async def _beat_forever(self) -> None:
        idle = 0
        while idle < IDLE_BEATS:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            idle = 0 if self.runs else idle + 1
            await self.beat()
        self._stop()

    async def _listen(self) -> None:
        """Cancel pushes from any process, until the pulse stops; reconnects after an error."""
        async for attempt in retrying("cancel listener", errors=(RedisError, OSError), max_wait=10.0):
            with attempt:
                await self._listen_once()

    async def _listen_once(self) -> None:
        if not settings.REDIS_URL:
            return
        client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(cancel_channel())
                async for message in pubsub.listen():
                    with contextlib.suppress(ValueError, AttributeError):
                        self.cancel(uuid.UUID(message["data"].decode()))
        finally:
            await client.aclose()


def pulse() -> Pulse:
    """The pulse of the running event loop (created on first use)."""
    return _pulses.get()


def _cancel_local(conversation_id: uuid.UUID) -> None:
    """Cancel the run wherever it runs in this process (any event loop)."""
    pulses = [p for _loop, p in _pulses.values()]
    current = asyncio.get_running_loop()
    for p in pulses:
        if conversation_id in p.runs:
            if p.loop is current:
                p.cancel(conversation_id)
            else:
                p.loop.call_soon_threadsafe(p.cancel, conversation_id)


async def push_cancel(conversation_id: uuid.UUID) -> None:
    """Tell the process that runs the conversation to stop it now (the flag is already set)."""
    _cancel_local(conversation_id)
    if not settings.REDIS_URL:
        return
    client = redis_client()
    if client is None:
        return
    try:
        await client.publish(cancel_channel(), str(conversation_id))
    except (RedisError, OSError) as exc:
        logger.warning(
            "cancel not pushed; the run stops at its next heartbeat",
            extra={"conversation": str(conversation_id), "error": repr(exc)},
        )
