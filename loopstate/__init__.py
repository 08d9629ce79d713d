"""State bound to one event loop: a value built lazily for each running loop.

asyncio clients (httpx and aiohttp sessions, redis.asyncio clients, psycopg pools) hold
connections bound to the loop that opened them; a process runs several loops (the server's,
`async_to_sync` in worker threads, each test's), so each keeps its own.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """Builds a value lazily for each event loop and forgets it when the loop is collected or,
    for a value that holds its loop, once the loop has closed (at the next value built)."""

    def __init__(self, factory: Callable[[], T], *, on_closed: Callable[[T], None] | None = None) -> None:
        """`on_closed(value)` lets go of what a value of a closed loop holds (it cannot await)."""
        self._factory = factory
        self._on_closed = on_closed
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self) -> T:
        """The value of the running loop (built on first use)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            value = self._values.get(loop)
            if value is None:
                self._forget_closed()
                value = self._values[loop] = self._factory()
            return value

    def peek(self) -> T | None:
        """The running loop's value if it has been built, else None."""
        with self._lock:
            return self._values.get(asyncio.get_running_loop())

    def pop(self) -> T | None:
        """Remove and return the running loop's value, if any."""
        loop = asyncio.get_running_loop()
        with self._lock:
            return self._values.pop(loop, None)

    def values(self) -> list[tuple[asyncio.AbstractEventLoop, T]]:
        """Every open loop's value, with its loop."""
        with self._lock:
            self._forget_closed()
            return list(self._values.items())

    def _forget_closed(self) -> None:
        for closed in [loop for loop in self._values if loop.is_closed()]:
            value = self._values.pop(closed)
            if self._on_closed is not None:
                self._on_closed(value)
