"""A procrastinate worker that outlives a lost database connection.

procrastinate 3.5's `Worker` assumes the database stays up: a failed heartbeat ends its
heartbeat task for good (so after the stalled timeout its live jobs look dead), a listener
that cannot reconnect ends listening, a failed job fetch stops the worker, a failed
periodic defer ends periodic tasks, and a job whose final status cannot be written stays
`doing` forever. `ResilientWorker` keeps each of these loops alive across errors, with a
capped back-off, and adds the recovery sweep of dead runs (streaming/jobs.py) as a
side task, so it runs every few seconds even when all job slots are busy.

Installed by `on_app_ready` (settings.PROCRASTINATE_ON_APP_READY) for
`manage.py procrastinate worker`, and by `streaming.tasks.worker_app` for in-process
workers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from procrastinate import App, jobs, retry, worker
from procrastinate.job_context import JobContext, JobResult

logger = logging.getLogger("polyagents.worker")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0
# How long a finished job's status is retried while the database is away.
PERSIST_GIVE_UP_SECONDS = 600.0
# A full garbage collection after this many collections of the middle generation (Python's
# default is 10); see settle_heap.
FULL_COLLECTION_EVERY = 100


def settle_heap() -> None:
    """Move what start-up built (modules, classes, settings, pools: about 250,000 objects) out
    of the garbage collector's sight, and make full collections rarer.

    For a process that serves many conversations at once, once it has warmed up. Under load a
    full collection walked the whole start-up heap each time: a web process that served 200
    concurrent /chat conversations had run 5 of them, 1.1-1.2 s in all (start-up's one or two
    included), pauses of about 250 ms on average for every run in flight. Frozen, and at most
    one per 100 middle-generation collections, none ran during the same load. The young
    generations keep Python's thresholds: raising them did not lower the total.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def backoff(failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row: capped, with jitter."""
    ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, failures - 1))
    return random.uniform(ceiling / 2, ceiling)


async def keep_running(
    name: str,
    step: Callable[[], Awaitable[Any]],
    interval: float,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Run `step` every `interval` seconds forever; an error is logged and retried with back-off."""
    failures = 0
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if on_error is not None:
                on_error()
            failures += 1
            logger.warning(f"{name} failed; retrying", extra={"error": repr(exc), "failures": failures})
            await asyncio.sleep(backoff(failures))
            continue
        if failures:
            logger.warning(f"{name} recovered", extra={"failures": failures})
        failures = 0
        await asyncio.sleep(interval)


class ResilientWorker(worker.Worker):
    # When this worker last failed to reach the database (event loop time).
    _database_lost_at = float("-inf")

    async def run(self) -> None:
        if self.wait:  # a worker that runs until stopped, not a burst that drains the queue
            settle_heap()
        await super().run()

    def _database_lost(self) -> None:
        self._database_lost_at = asyncio.get_running_loop().time()

    async def _update_heartbeat(self) -> None:
        await asyncio.sleep(self.update_heartbeat_interval)
        await keep_running(
            "worker heartbeat", self._beat, self.update_heartbeat_interval, on_error=self._database_lost
        )

    async def _beat(self) -> None:
        assert self.worker_id is not None
        row = await self.app.connector.execute_query_one_async(
            "UPDATE procrastinate_workers SET last_heartbeat = NOW() WHERE id = %(id)s RETURNING id",
            id=self.worker_id,
        )
        if row is None:
            await self._register_again()

    async def _register_again(self) -> None:
        """Another worker pruned this one (no heartbeat during an outage): register anew, keep its jobs."""
        old = self.worker_id
        self.worker_id = await self.app.job_manager.register_worker()
        running = [context.job.id for context in self._running_jobs.values() if context.job.id]
        if running:
            await self.app.connector.execute_query_async(
                "UPDATE procrastinate_jobs SET worker_id = %(worker)s"
                " WHERE id = ANY(%(ids)s) AND status = 'doing' AND worker_id IS NULL",
                worker=self.worker_id,
                ids=running,
            )
        logger.warning("worker was pruned; registered again", extra={"old": old, "new": self.worker_id})

    async def _listen(self) -> None:
        """LISTEN for new jobs, reconnecting after any error (polling covers the gap)."""
        failures = 0
        while True:
            try:
                await self.app.job_manager.listen_for_jobs(
                    on_notification=self._handle_notification, queues=self.queues
                )
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._database_lost()
                failures += 1
                logger.warning("listener lost its connection; reconnecting", extra={"error": repr(exc)})
            await asyncio.sleep(backoff(failures + 1))
            # Jobs may have been queued while not listening.
            self._new_job_event.set()

    async def _periodic_deferrer(self) -> None:
        failures = 0
        while True:
            try:
                await super()._periodic_deferrer()
                return  # no periodic task registered
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                logger.warning("periodic deferrer failed; restarting", extra={"error": repr(exc)})
                await asyncio.sleep(backoff(failures))

    async def _recover_runs(self) -> None:
        from streaming.jobs import sweep_stale_conversations
        from streaming.tasks import fresh_connections

        loop = asyncio.get_running_loop()

        async def step() -> None:
            # After an outage every heartbeat is old, live runs' too: give them time to beat
            # again before anything is taken over.
            if loop.time() - self._database_lost_at < settings.CONVERSATION_STALE_SECONDS:
                return
            async with fresh_connections():
                await sweep_stale_conversations()

        interval = settings.RECOVERY_SWEEP_SECONDS
        await asyncio.sleep(random.uniform(0, interval))
        await keep_running("recovery sweep", step, interval, on_error=self._database_lost)

    def _start_side_tasks(self) -> list[asyncio.Task[Any]]:
        listen, self.listen_notify = self.listen_notify, False
        try:
            side_tasks: list[asyncio.Task[Any]] = super()._start_side_tasks()
        finally:
            self.listen_notify = listen
        if listen:
            side_tasks.append(asyncio.create_task(self._listen(), name="listener"))
        if settings.USING_POSTGRES:
            side_tasks.append(asyncio.create_task(self._recover_runs(), name="recover_runs"))
        return side_tasks

    async def _fetch_and_process_jobs(self) -> None:
        try:
            await super()._fetch_and_process_jobs()
        except Exception as exc:  # ConnectorException, PoolTimeout: the database is away
            self._database_lost()
            # The main loop polls again after fetch_job_polling_interval.
            logger.warning("fetching jobs failed", extra={"error": repr(exc)})

    async def _persist_job_status(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: JobContext,
        job_result: JobResult | None,
    ) -> None:
        """Write a finished job's status, retrying while the database is away.

        Without this, a job that ended during an outage stayed `doing` under a live worker:
        never retried, and holding its lock.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PERSIST_GIVE_UP_SECONDS
        failures = 0
        while True:
            try:
                await super()._persist_job_status(job, status, retry_decision, context, job_result)
                return
            except Exception as exc:  # ConnectorException, PoolTimeout: the database is away
                failures += 1
                if loop.time() > deadline:
                    raise
                logger.warning("job status not saved; retrying", extra={"job_id": job.id, "error": repr(exc)})
                await asyncio.sleep(backoff(failures))


def install(app: App) -> App:
    """Make `app` run `ResilientWorker`s (procrastinate builds its worker in `App._worker`)."""

    def _worker(**kwargs: Any) -> worker.Worker:
        return ResilientWorker(app=app, **{**app.worker_defaults, **kwargs})

    app._worker = _worker  # type: ignore[method-assign]
    return app


def on_app_ready(app: App) -> None:
    install(app)
