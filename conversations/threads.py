"""Blocking ORM work off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

T = TypeVar("T")


async def in_pool_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in a thread of the pool.

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
