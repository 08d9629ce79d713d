"""Rounds: the writes of many conversations that become ready together share one round trip.

A conversation's event log stores a batch, then sends it to Redis, then takes its next batch.
Hundreds of conversations in one process do that at once; each round trip costs the client
far more CPU (the driver's request and reply handling, a task switch each way) than the rows
it carries. `Rounds` gathers the items submitted while a round is in flight and does them all
in the next round: one statement, one pipeline. An idle process pays nothing for it (the first
item starts a round at once), a busy one pays one round trip for many batches.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Rounds(Generic[T, R]):
    """Items submitted while a round runs go together in the next round.

    `do_round(items)` returns one outcome per item, in order: its result, or the exception that
    item's `submit` raises. Each caller waits for its own item only. Items of one conversation
    keep their order as long as its caller submits the next only after the previous one is done
    (an event log does).
    """

    def __init__(self, do_round: Callable[[list[T]], Awaitable[list[R | BaseException]]]) -> None:
        self._do_round = do_round
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, done))
        if self._task is None or self._task.done():
            # Its own context: a round never runs in the context (a pinned connection, say) of
            # whichever caller happened to start it.
            self._task = loop.create_task(self._run(), context=contextvars.Context())
        # A caller cancelled while it waits cancels only its own future: the round, and the
        # others in it, go on (the round skips a future already done).
        return await done

    async def _run(self) -> None:
        while self._waiting:
            round_, self._waiting = self._waiting, []
            try:
                outcomes = await self._do_round([item for item, _ in round_])
            except asyncio.CancelledError:
                for _, done in round_:
                    done.cancel()  # the loop is going away: nobody is left to answer
                raise
            except Exception as exc:  # a fault of the round itself: each of its callers gets it
                outcomes = [exc] * len(round_)
            for (_, done), outcome in zip(round_, outcomes, strict=True):
                if done.done():
                    continue
                if isinstance(outcome, BaseException):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)
