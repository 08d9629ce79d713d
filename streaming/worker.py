"""`manage.py worker`: procrastinate workers that are crash-only.

A worker that loses its database ends: procrastinate's own job fetch fails, or one of its
loops dies of it (the heartbeat, LISTEN, a job status write: streaming/compat/procrastinate.py
hears it). Its jobs get `shutdown_graceful_timeout` to finish (a run rides through a short
restart: its writes are retried), then procrastinate aborts them. `serve` starts a fresh worker
as soon as the database answers again; before that worker fetches anything, the jobs whose
final status its predecessor could not write (left `doing`, they can run nowhere else) are put
back in the queue, so an interrupted run resumes at once. Beside each worker the recovery sweep
(streaming/jobs.py) resumes the runs that died in other processes. Any other error ends the
process, non-zero: the process manager (compose `restart:`) starts it again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from typing import Any

import psycopg
from django.conf import settings
from procrastinate.contrib.django.utils import connector_params
from procrastinate.exceptions import ConnectorException
from procrastinate.manager import JobManager
from psycopg_pool import PoolTimeout

from conversations.liveness import keep_running, retrying
from streaming.compat.procrastinate import WorkerWatch
from streaming.jobs import retry_dead_job, sweep_stale_conversations
from streaming.tasks import fresh_connections, worker_app

logger = logging.getLogger("polyagents.worker")

# A full garbage collection after this many collections of the middle generation (Python's
# default is 10); see settle_heap.
FULL_COLLECTION_EVERY = 100
# The longest wait between two tries to reach the database again.
RESTART_MAX_WAIT = 0.5
CONNECT_TIMEOUT = 2


class DatabaseLost(Exception):
    """One of the worker's loops failed: it lost its database."""


DATABASE_ERRORS = (DatabaseLost, ConnectorException, psycopg.OperationalError, PoolTimeout)


def settle_heap() -> None:
    """Move what start-up built (modules, classes, settings, pools: about 250,000 objects) out
    of the garbage collector's sight, and make full collections rarer.

    For a process that serves many conversations at once, once it has warmed up: under load a
    full collection otherwise walks the whole start-up heap each time, a pause felt by every
    run in flight. The young generations keep Python's thresholds: raising them did not lower
    the total.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


async def serve(**options: Any) -> None:
    """Run workers one after another until one is stopped by a signal (SIGTERM, SIGINT).

    `options` are procrastinate's worker options, over PROCRASTINATE_WORKER_DEFAULTS.
    """
    settle_heap()
    unsaved: set[int] = set()  # jobs a lost worker of this process left `doing`
    async for attempt in retrying("worker", errors=DATABASE_ERRORS, max_wait=RESTART_MAX_WAIT):
        with attempt:
            await database_answers()
            await work(unsaved, **options)


async def database_answers() -> None:
    """Raise psycopg.OperationalError unless the database accepts a connection now.

    Opening procrastinate's pool waits up to 30 s for a database that is away; this fails at once.
    """
    async with await psycopg.AsyncConnection.connect(
        **connector_params(), connect_timeout=CONNECT_TIMEOUT
    ) as connection:
        await connection.execute("SELECT 1")


async def work(unsaved: set[int], **options: Any) -> None:
    """One worker, until it is stopped (returns) or loses its database (raises).

    First the jobs in `unsaved` are released; the ids of the jobs whose final status this
    worker could not write are added to it.
    """
    after_loss = bool(unsaved)
    async with worker_app().open_async() as app:
        await release(app.job_manager, unsaved)
        watch = WorkerWatch()
        watching = asyncio.create_task(watch.run())
        worker = asyncio.create_task(app.run_worker_async(**options))
        sweep = asyncio.create_task(sweep_forever(settle=after_loss))
        try:
            await asyncio.wait([worker, watch.failed], return_when=asyncio.FIRST_COMPLETED)
            if watch.failed.done():
                error = repr(watch.failed.result())
                logger.error("a worker loop failed; stopping the worker", extra={"error": error})
                worker.cancel()  # procrastinate stops: its jobs get shutdown_graceful_timeout
                await asyncio.wait([worker])
                if not worker.cancelled():
                    worker.exception()  # ending on a lost database too: retrieved, not logged as unseen
                raise DatabaseLost(error)
            worker.result()  # a failed job fetch raises here
        finally:
            for task in (watching, sweep):
                task.cancel()
            await asyncio.wait([watching, sweep])
            unsaved.update(watch.unsaved)


async def release(manager: JobManager, unsaved: set[int]) -> None:
    """Put back in the queue the jobs a lost worker of this process left `doing`, then forget them.

    That worker is gone, its jobs ended: nothing else runs them. A run that had finished is not
    run again (run_conversation is idempotent once done).
    """
    for job_id in sorted(unsaved):
        for job in await manager.list_jobs_async(id=job_id, status="doing"):
            if await retry_dead_job(manager, job):
                logger.warning("job of a lost worker queued again", extra={"job_id": job.id})
        unsaved.discard(job_id)


async def sweep_forever(*, settle: bool) -> None:
    """The recovery sweep of dead runs, every RECOVERY_SWEEP_SECONDS.

    With `settle` (the database was just lost) it waits CONVERSATION_STALE_SECONDS first: after
    an outage every heartbeat is old, live runs' too; they get the time to beat again.
    """
    interval = settings.RECOVERY_SWEEP_SECONDS
    await asyncio.sleep(settings.CONVERSATION_STALE_SECONDS if settle else random.uniform(0, interval))

    async def sweep() -> None:
        async with fresh_connections():
            await sweep_stale_conversations()

    await keep_running("recovery sweep", sweep, interval)
