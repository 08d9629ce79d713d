"""procrastinate tasks: run a conversation, and the periodic maintenance that keeps runs honest.

Workers: `python manage.py procrastinate worker` (PostgreSQL deployments only).
"""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any, cast

import attr
from procrastinate import App, JobContext, RetryDecision, RetryStrategy
from procrastinate.contrib.django import app
from procrastinate.contrib.django.django_connector import DjangoConnector
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager

logger = logging.getLogger("polyagents.tasks")

RUN_MAX_ATTEMPTS = 4
STALLED_JOB_SECONDS = 30.0
STALLED_MAX_ATTEMPTS = RUN_MAX_ATTEMPTS


def worker_app() -> App:
    """The app on a psycopg pool connector: what workers need (Django's connector returns jsonb as text)."""
    connector = cast(DjangoConnector, app.connector)
    return app.with_connector(connector.get_worker_connector())


async def run_worker_until_idle(**options: Any) -> None:
    """Process queued jobs until none is left, in this process (tests, benchmarks, one-off drains)."""
    async with worker_app().open_async() as burst:
        await burst.run_worker_async(
            wait=False, listen_notify=False, install_signal_handlers=False, **options
        )


@attr.dataclass(kw_only=True)
class JitteredRetry(RetryStrategy):
    """procrastinate's RetryStrategy (bounded by max_attempts) plus full jitter, capped at max_wait."""

    max_wait: int = 60

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        decision = super().get_retry_decision(exception=exception, job=job)
        if decision is None:
            return None
        ceiling = min(self.max_wait, self.wait + self.exponential_wait ** (job.attempts + 1))
        return RetryDecision(retry_in={"seconds": random.randint(1, max(1, ceiling))})


@app.task(
    name="conversations.run_conversation",
    retry=JitteredRetry(max_attempts=RUN_MAX_ATTEMPTS, wait=1, exponential_wait=2, max_wait=30),
)
async def run_conversation(conversation_id: str, exchange: int) -> None:
    """Run (or resume after a crash) one exchange of a conversation."""
    from conversations.services import conversation_run

    await conversation_run(conversation_id=uuid.UUID(conversation_id), exchange=exchange)


async def retry_stalled_jobs(
    manager: JobManager, seconds_since_heartbeat: float = STALLED_JOB_SECONDS
) -> int:
    """Put back in the queue the jobs of workers that stopped sending heartbeats (killed, lost)."""
    stalled = await manager.get_stalled_jobs(seconds_since_heartbeat=seconds_since_heartbeat)
    count = 0
    for job in stalled:
        if job.attempts + 1 >= STALLED_MAX_ATTEMPTS:
            # A job that keeps killing its worker must not loop forever: fail it. The
            # conversation's own sweep then re-enqueues it (bounded) or marks it failed.
            if job.id is not None:
                await manager.finish_job_by_id_async(job.id, status=Status.FAILED, delete_job=False)
            logger.error("stalled job failed after too many attempts", extra={"job_id": job.id})
            continue
        try:
            await manager.retry_job(job)
        except Exception:  # e.g. a newer job already holds its queueing lock
            logger.exception("stalled job not retried", extra={"job_id": job.id, "task": job.task_name})
            continue
        count += 1
        logger.warning("stalled job retried", extra={"job_id": job.id, "task": job.task_name})
    return count


@app.periodic(cron="* * * * *")
@app.task(name="conversations.sweep", queueing_lock="conversations.sweep", pass_context=True)
async def sweep(context: JobContext, timestamp: int) -> dict[str, Any]:
    """Every minute: retry stalled jobs, then re-enqueue or fail conversations with a dead heartbeat."""
    from streaming.jobs import sweep_stale_conversations

    retried = await retry_stalled_jobs(context.app.job_manager)
    report = await sweep_stale_conversations()
    return {"stalled_jobs_retried": retried, "requeued": report.requeued, "failed": report.failed}
