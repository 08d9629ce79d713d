"""procrastinate tasks: run a conversation, and the periodic maintenance that keeps runs honest.

Workers: `python manage.py worker` (PostgreSQL deployments only; streaming/worker.py).
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import attr
from asgiref.sync import sync_to_async
from django.db import close_old_connections
from procrastinate import App, JobContext, PsycopgConnector, RetryDecision, RetryStrategy
from procrastinate.contrib.django import app
from procrastinate.contrib.django.utils import connector_params
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager

from conversations.services import conversation_run
from streaming.jobs import RUN_MAX_ATTEMPTS, RUN_TASK, sweep_stale_conversations

logger = logging.getLogger("polyagents.tasks")

POOL_TIMEOUT_SECONDS = 5.0
STALLED_JOB_SECONDS = 30.0
STALLED_MAX_ATTEMPTS = RUN_MAX_ATTEMPTS


def worker_app() -> App:
    """The app on a psycopg pool connector: what workers need (Django's connector returns jsonb as text).

    A statement waits at most POOL_TIMEOUT_SECONDS for a connection: a worker whose database
    is away learns it soon, and a stopping worker does not hang on its jobs' last status writes.
    """
    return app.with_connector(PsycopgConnector(kwargs=connector_params(), timeout=POOL_TIMEOUT_SECONDS))


async def run_worker_until_idle(**options: Any) -> None:
    """Process queued jobs until none is left, in this process (tests, benchmarks, one-off drains)."""
    async with worker_app().open_async() as burst:
        await burst.run_worker_async(
            wait=False, listen_notify=False, install_signal_handlers=False, **options
        )


@attr.dataclass(kw_only=True)
class JitteredRetry(RetryStrategy):
    """procrastinate's RetryStrategy (bounded by max_attempts), exponential from `wait` seconds,
    capped at max_wait, with "equal jitter": between half and all of the step."""

    max_wait: int = 60

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        decision = super().get_retry_decision(exception=exception, job=job)
        if decision is None:
            return None
        step = min(self.max_wait, self.wait * self.exponential_wait**job.attempts)
        wait = timedelta(seconds=random.uniform(step / 2, step))
        return RetryDecision(retry_at=datetime.now(UTC) + wait)


@asynccontextmanager
async def fresh_connections() -> AsyncIterator[None]:
    """Discard the broken or expired Django connections of the ORM thread before and after a job.

    Django does this around each web request; a worker has no requests, so a connection a
    database restart killed would otherwise fail every later job ("the connection is closed").
    """
    await sync_to_async(close_old_connections)()
    try:
        yield
    finally:
        await sync_to_async(close_old_connections)()


@app.task(
    name=RUN_TASK,
    retry=JitteredRetry(max_attempts=RUN_MAX_ATTEMPTS, wait=5, exponential_wait=2, max_wait=60),
)
async def run_conversation(conversation_id: str, exchange: int) -> None:
    """Run (or resume after a crash) one exchange of a conversation (idempotent once done)."""
    async with fresh_connections():
        await conversation_run(conversation_id=uuid.UUID(conversation_id), exchange=exchange)


async def retry_stalled_jobs(
    manager: JobManager, seconds_since_heartbeat: float = STALLED_JOB_SECONDS
) -> int:
    """Put back in the queue the jobs of workers that stopped sending heartbeats (killed, lost).

    Conversation runs are not touched here: `sweep_stale_conversations` alone recovers them,
    from the conversation's own heartbeat, so two paths never race for one dead run.
    """
    stalled = await manager.get_stalled_jobs(seconds_since_heartbeat=seconds_since_heartbeat)
    count = 0
    for job in stalled:
        if job.task_name == RUN_TASK:
            continue
        if job.attempts + 1 >= STALLED_MAX_ATTEMPTS:
            # A job that keeps killing its worker must not loop forever: fail it.
            if job.id is not None:
                await manager.finish_job_by_id_async(job.id, status=Status.FAILED, delete_job=False)
            logger.error("stalled job failed after too many attempts", extra={"job_id": job.id})
            continue
        try:
            await manager.retry_job(job)
        except Exception:  # e.g. a newer job already holds its queueing lock: this one is not needed
            if job.id is not None:
                await manager.finish_job_by_id_async(job.id, status=Status.FAILED, delete_job=False)
            logger.warning("stalled job failed: a newer one is queued", extra={"job_id": job.id})
            continue
        count += 1
        logger.warning("stalled job retried", extra={"job_id": job.id, "task": job.task_name})
    return count


@app.periodic(cron="* * * * *")
@app.task(name="conversations.sweep", queueing_lock="conversations.sweep", pass_context=True)
async def sweep(context: JobContext, timestamp: int) -> dict[str, Any]:
    """Every minute: retry stalled maintenance jobs, and recover dead runs.

    Each `manage.py worker` also recovers dead runs every RECOVERY_SWEEP_SECONDS
    (streaming/worker.py); this is the same idempotent sweep, for any other worker.
    """
    async with fresh_connections():
        retried = await retry_stalled_jobs(context.app.job_manager)
        report = await sweep_stale_conversations()
    return {
        "stalled_jobs_retried": retried,
        "requeued": report.requeued,
        "resumed": report.resumed,
        "failed": report.failed,
        "queued": report.queued,
        "alive": report.alive,
    }
