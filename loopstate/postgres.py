"""Each event loop's small psycopg connection pool, for the statements that run on the loop
itself (no thread hop, no ORM): the event store's and the gateway's admission checks.

Connections run in autocommit (one statement is one transaction) and are not checked before
each use (that is one more round trip): a connection that died with a restarted database
fails its statement; `fetch_one` then runs it once more on a fresh pool, and a batch writer
retries after `discard_pool`.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import psycopg_pool
from django.conf import settings
from psycopg.conninfo import make_conninfo
from psycopg.types.json import set_json_loads
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from loopstate import PerLoop

POOL_MAX = 4  # per event loop: batches of many conversations share a few connections

# Short, so a write retried while the database is away tries a fresh pool several times.
GETCONN_TIMEOUT = 3.0

# What a statement raises when its connection (or the database) is gone.
LOST: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg_pool.PoolTimeout,
)


@dataclass
class _Slot:
    """The running loop's pool, the conninfo it was opened with, the task opening it, and the
    connections it made."""

    conninfo: str = ""
    pool: psycopg_pool.AsyncConnectionPool | None = None
    opening: asyncio.Task[None] | None = None
    connections: weakref.WeakSet[psycopg.AsyncConnection[Any]] = field(default_factory=weakref.WeakSet)


def _end_connections(slot: _Slot) -> None:
    """A closed loop's pool can no longer be closed: end its connections (tests, async_to_sync)."""
    for conn in list(slot.connections):
        conn.pgconn.finish()


_slots: PerLoop[_Slot] = PerLoop(_Slot, on_closed=_end_connections)
_closing: set[asyncio.Task[None]] = set()
# The connection every statement of this context runs on (`on_every_connection`), else None.
_pinned: contextvars.ContextVar[Any] = contextvars.ContextVar("polyagents_pg_pinned", default=None)


def _conninfo() -> str:
    # settings, not connections["default"]: on the event loop that lookup builds a new
    # DatabaseWrapper in every task context. The test runner updates both with the test NAME.
    s = settings.DATABASES["default"]
    params = {
        "dbname": s.get("NAME"),
        "user": s.get("USER"),
        "password": s.get("PASSWORD"),
        "host": s.get("HOST"),
        "port": str(s["PORT"]) if s.get("PORT") else None,
    }
    return make_conninfo("", **{k: v for k, v in params.items() if v})


def _configure(slot: _Slot) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        """A new connection reads JSON columns (a run's begin, a /chat body) with orjson."""
        set_json_loads(orjson.loads, conn)
        slot.connections.add(conn)

    return configure


def _opened(opening: asyncio.Task[None] | None) -> bool:
    return opening is not None and opening.done() and not opening.cancelled() and opening.exception() is None


def _new_pool(conninfo: str, slot: _Slot) -> psycopg_pool.AsyncConnectionPool:
    return psycopg_pool.AsyncConnectionPool(
        conninfo,
        # All opened at once (in the background): a pool that grows under load connects while
        # batches wait.
        min_size=POOL_MAX,
        max_size=POOL_MAX,
        open=False,
        timeout=10,
        name="polyagents-events",
        configure=_configure(slot),
        # The name is visible in pg_stat_activity; autocommit makes each statement its own
        # transaction; UTC, so datetimes read back are the ORM's.
        kwargs={"application_name": "polyagents-events", "autocommit": True, "options": "-c TimeZone=UTC"},
    )


async def pool() -> psycopg_pool.AsyncConnectionPool:
    """The open connection pool of the running event loop (created on first use)."""
    slot = _slots.get()
    conninfo = _conninfo()
    if slot.pool is not None and slot.conninfo == conninfo and _opened(slot.opening):
        return slot.pool  # every statement comes here: no shield of a finished task
    failed = slot.opening is not None and slot.opening.done() and not _opened(slot.opening)
    if slot.pool is None or slot.conninfo != conninfo or failed:
        if slot.pool is not None:
            _close_later(slot.pool)  # never opened (the database was away), or another database
        slot.conninfo, slot.pool = conninfo, _new_pool(conninfo, slot)
        slot.opening = asyncio.get_running_loop().create_task(slot.pool.open(wait=True, timeout=10))
    assert slot.opening is not None
    assert slot.pool is not None
    events_pool = slot.pool
    await asyncio.shield(slot.opening)
    return events_pool


def pinned() -> bool:
    """Whether this context's statements run on one pinned connection (`on_every_connection`)."""
    return _pinned.get() is not None


async def execute(sql: str, params: Any, *, fetch: bool = False) -> tuple[Any, ...] | None:
    """Run one statement on the pinned connection, else on one of the running loop's pool; its
    first row when `fetch`.

    `getconn`/`putconn` rather than the pool's `connection()` context: that adds a transaction
    block autocommit does not need. `putconn` still checks the connection and replaces a
    broken one.
    """
    pinned = _pinned.get()
    if pinned is not None:
        return await _execute_on(pinned, sql, params, fetch)
    events_pool = await pool()
    conn = await events_pool.getconn(timeout=GETCONN_TIMEOUT)
    try:
        return await _execute_on(conn, sql, params, fetch)
    finally:
        await events_pool.putconn(conn)


async def _execute_on(conn: Any, sql: str, params: Any, fetch: bool) -> tuple[Any, ...] | None:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchone() if fetch else None


async def fetch_one(sql: str, params: Any) -> tuple[Any, ...] | None:
    """The first row of a statement; a connection that died with a restarted database fails
    it, and it runs once more on a fresh pool."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((psycopg.OperationalError, psycopg.InterfaceError)),
        stop=stop_after_attempt(2),
        before_sleep=_discard_before_retry,
        reraise=True,
    ):
        with attempt:
            return await execute(sql, params, fetch=True)
    raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover


async def _discard_before_retry(_state: Any) -> None:
    await discard_pool()


def _close_later(old: psycopg_pool.AsyncConnectionPool) -> None:
    task = asyncio.get_running_loop().create_task(old.close(timeout=1.0))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def discard_pool() -> None:
    """Drop the running loop's pool after a failed statement; the next one opens a fresh pool.

    A pool whose connections died with the database reconnects with a growing back-off and
    can keep refusing for a while after the database is back; a new pool connects at once.
    """
    slot = _slots.pop()
    if slot is not None and slot.pool is not None:
        _close_later(slot.pool)


async def close_pool() -> None:
    """Close the running loop's pool (tests and process shutdown)."""
    slot = _slots.pop()
    if slot is not None and slot.pool is not None:
        await slot.pool.close()


def pool_size() -> int:
    """How many connections the running loop's pool holds now (0 without one)."""
    slot = _slots.peek()
    if slot is None or slot.pool is None:
        return 0
    return int(slot.pool.get_stats().get("pool_size", 0))


async def on_every_connection(rehearsal: Callable[[], Awaitable[None]]) -> None:
    """Run `rehearsal`'s statements once on each connection of the pool, in a transaction that
    is rolled back (nothing stays).

    A fresh backend loads its catalog and plans its foreign-key checks on first use, and psycopg
    builds its side per connection: the warm-up pays that before the first run instead of the run.
    """
    events_pool = await pool()
    held = [await events_pool.getconn(timeout=GETCONN_TIMEOUT) for _ in range(POOL_MAX)]
    try:
        for conn in held:
            token = _pinned.set(conn)
            try:
                async with conn.transaction(force_rollback=True):
                    await rehearsal()
            finally:
                _pinned.reset(token)
    finally:
        for conn in held:
            await events_pool.putconn(conn)
