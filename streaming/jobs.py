"""Running conversations in the background, and sweeping the ones whose run died.

On PostgreSQL a run is a procrastinate job (the task RUN_TASK, streaming/tasks.py) that any
`manage.py worker` on any machine picks up; on the embedded SQLite default it is an asyncio
task of the web process. The streaming modules import downwards only: worker -> tasks -> jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.db.models import Q
from django.utils import timezone
from procrastinate.contrib.django import app
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager

from conversations.events import EventLog
from conversations.liveness import keep_running
from conversations.models import Conversation
from conversations.services import conversation_run

logger = logging.getLogger("polyagents.jobs")

# Strong references to in-process runs, so the event loop does not garbage-collect them.
_background: set[asyncio.Task[None]] = set()

SWEEP_MAX_REQUEUES = 2
RUN_TASK = "conversations.run_conversation"
# A run's retries (a crash, a lost database) wait 2.5-5 s, 5-10 s, 10-20 s, 20-40 s, 30-60 s:
# together at least 67 s, so they span a database restart or a short outage.
RUN_MAX_ATTEMPTS = 6


def job_lock(conversation_id: uuid.UUID | str) -> str:
    """The procrastinate lock of a conversation: never two runs of it at once, never two queued."""
    return f"conversation:{conversation_id}"


async def enqueue_run(conversation_id: uuid.UUID, exchange: int) -> str:
    """Start running an exchange in the background: "procrastinate", "already_queued" or "in_process"."""
    if settings.USING_POSTGRES:
        lock = job_lock(conversation_id)
        try:
            await app.configure_task(RUN_TASK, lock=lock, queueing_lock=lock).defer_async(
                conversation_id=str(conversation_id), exchange=exchange
            )
        except AlreadyEnqueued:
            logger.info("run already queued", extra={"conversation_id": str(conversation_id)})
            return "already_queued"
        return "procrastinate"
    task = asyncio.get_running_loop().create_task(run_in_process(conversation_id, exchange))
    _background.add(task)
    task.add_done_callback(_background.discard)
    return "in_process"


async def run_in_process(conversation_id: uuid.UUID, exchange: int) -> None:
    """The SQLite path: run this exchange in this process (`start_in_process_sweeper` resumes dead ones)."""
    try:
        await conversation_run(conversation_id=conversation_id, exchange=exchange)
    except Exception:
        # conversation_run records its own failures; one it could not record (the database
        # was away) leaves the conversation running: the sweep resumes it once it is stale.
        logger.exception("in-process run crashed", extra={"conversation_id": str(conversation_id)})


# One recovery loop per event loop of a web process on the embedded defaults.
_sweepers: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}


def start_in_process_sweeper() -> None:
    """On SQLite, resume (in this process) or fail the runs a previous web process left behind.

    Called on the first request a web process serves (polyagents_site/asgi.py); then every
    RECOVERY_SWEEP_SECONDS. A run is taken over only once its heartbeat is older than
    CONVERSATION_STALE_SECONDS, so the live runs of another process are left alone.
    """
    if settings.USING_POSTGRES or not settings.RECOVERY_SWEEP_IN_PROCESS:
        return
    loop = asyncio.get_running_loop()
    if loop in _sweepers:
        return
    for other in [key for key in _sweepers if key.is_closed()]:
        del _sweepers[other]
    _sweepers[loop] = loop.create_task(_sweep_forever(), name="recovery sweep")


async def _sweep_forever() -> None:
    await keep_running("recovery sweep", sweep_stale_conversations, settings.RECOVERY_SWEEP_SECONDS)


async def wait_for_background_runs(timeout: float | None = None) -> None:
    """Wait for the in-process runs of this event loop (tests and graceful shutdown)."""
    loop = asyncio.get_running_loop()
    tasks = [task for task in _background if task.get_loop() is loop]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)  # a new job was queued
    resumed: list[str] = field(default_factory=list)  # the dead worker's job was put back in the queue
    failed: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)  # a queued job will resume it
    alive: list[str] = field(default_factory=list)  # a live worker still runs it


async def fail_conversation(conversation: Conversation, reason: str) -> None:
    """Mark a dead run failed, with its reason, and tell the followers."""
    updated = await Conversation.objects.filter(
        pk=conversation.pk, status__in=[Conversation.Status.RUNNING, Conversation.Status.PENDING]
    ).aupdate(status=Conversation.Status.FAILED, error=reason, completed_at=timezone.now())
    if updated:
        log = await EventLog.open(conversation.pk)
        await log.emit("conversation_failed", status="failed", reason=reason, exchange=conversation.exchanges)


async def sweep_stale_conversations(
    *,
    older_than: float | None = None,
    requeue: bool = True,
    max_requeues: int = SWEEP_MAX_REQUEUES,
    now: datetime | None = None,
) -> SweepReport:
    """The one owner of the recovery of dead runs: resume or fail "running" conversations
    whose heartbeat is older than `older_than` seconds (CONVERSATION_STALE_SECONDS).

    On PostgreSQL the procrastinate job behind a stale conversation decides:
    - a `doing` job of a live worker (worker heartbeat fresh): left alone, a live worker owns it;
    - a `doing` job of a dead worker: that same job is put back to `todo` (it keeps its lock,
      so no second job can ever wait behind it), up to RUN_MAX_ATTEMPTS, then the
      conversation is failed;
    - a `todo` job: it will resume the run; a dead `doing` job beside it (left by older
      versions) is failed, so its lock no longer blocks the queued one;
    - no job at all (lost, or failed while the database was away): a new job, at most
      `max_requeues` times, then the conversation is failed.
    On SQLite the run is resumed in this process (bounded the same way). With
    `requeue=False` stale conversations are failed. `now` is the clock (tests inject one).
    """
    seconds = settings.CONVERSATION_STALE_SECONDS if older_than is None else older_than
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=seconds)
    # Running with an old heartbeat; with requeueing also pending ones, whose job may be lost.
    statuses = [Conversation.Status.RUNNING]
    if requeue:
        statuses.append(Conversation.Status.PENDING)
    stale = Conversation.objects.filter(status__in=statuses).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, updated_at__lt=cutoff)
    )
    report = SweepReport()
    async for conversation in stale:
        try:
            if not requeue:
                await _fail_stale(conversation, f"worker lost: no heartbeat for {seconds:g}s", report)
            elif settings.USING_POSTGRES:
                await _recover_job(conversation, seconds, cutoff, now, max_requeues, report)
            else:
                await _requeue_or_fail(conversation, seconds, max_requeues, report)
        except (OperationalError, InterfaceError):
            raise  # the database is away: the whole sweep is tried again later
        except Exception:
            # One conversation must not stop the sweep of the others.
            logger.exception(
                "stale conversation not recovered", extra={"conversation_id": str(conversation.pk)}
            )
    return report


async def _fail_stale(conversation: Conversation, reason: str, report: SweepReport) -> None:
    await fail_conversation(conversation, reason)
    report.failed.append(str(conversation.pk))
    logger.warning(
        "stale conversation failed", extra={"conversation_id": str(conversation.pk), "reason": reason}
    )


async def _requeue_or_fail(
    conversation: Conversation, seconds: float, max_requeues: int, report: SweepReport
) -> None:
    """No run behind the conversation: start a new one (bounded), or fail it."""
    attempts = int(conversation.metadata.get("sweep_requeues", 0))
    if attempts >= max_requeues:
        reason = f"worker lost: no heartbeat for {seconds:g}s after {attempts} re-enqueue(s)"
        await _fail_stale(conversation, reason, report)
        return
    # Claim it (status and heartbeat unchanged since read): two sweeps never both start a run.
    claimed = await Conversation.objects.filter(
        pk=conversation.pk, status=conversation.status, heartbeat_at=conversation.heartbeat_at
    ).aupdate(metadata={**conversation.metadata, "sweep_requeues": attempts + 1}, heartbeat_at=timezone.now())
    if not claimed:
        return
    if await enqueue_run(conversation.pk, conversation.exchanges) == "already_queued":
        # Its job is still waiting for a worker: not a lost run, so no attempt is spent.
        await Conversation.objects.filter(pk=conversation.pk).aupdate(metadata=conversation.metadata)
        return
    report.requeued.append(str(conversation.pk))
    logger.warning("stale conversation re-enqueued", extra={"conversation_id": str(conversation.pk)})


async def _recover_job(
    conversation: Conversation,
    seconds: float,
    cutoff: datetime,
    now: datetime,
    max_requeues: int,
    report: SweepReport,
) -> None:
    from procrastinate.contrib.django.models import ProcrastinateJob  # only with the app installed

    worker_cutoff = now - timedelta(seconds=settings.WORKER_STALLED_SECONDS)
    rows = [
        row
        async for row in ProcrastinateJob.objects.filter(  # type: ignore[misc]
            lock=job_lock(conversation.pk), status__in=["todo", "doing"]
        ).select_related("worker")
    ]
    todo = [row for row in rows if row.status == "todo"]
    doing = [row for row in rows if row.status == "doing"]
    dead = [row for row in doing if row.worker is None or row.worker.last_heartbeat < worker_cutoff]
    # Read again after the jobs: a run that just finished or beat its heartbeat is not dead.
    current = await Conversation.objects.filter(pk=conversation.pk).afirst()
    if current is None or current.is_terminal:
        return
    beat = current.heartbeat_at or current.updated_at
    if beat is not None and beat >= cutoff:
        return
    if len(dead) < len(doing):
        report.alive.append(str(conversation.pk))  # a live worker runs it: a heartbeat proves life
        logger.info(
            "stale conversation left to its live worker", extra={"conversation_id": str(conversation.pk)}
        )
        return
    manager = app.job_manager
    if todo:
        for row in dead:
            await manager.finish_job_by_id_async(row.id, status=Status.FAILED, delete_job=False)
            logger.warning("dead job behind a queued one failed", extra={"job_id": row.id})
        report.queued.append(str(conversation.pk))
        return
    if dead:
        row = dead[0]
        if not await retry_dead_job(manager, row.procrastinate_job):
            reason = f"worker lost: no heartbeat for {seconds:g}s, {row.attempts + 1} attempt(s)"
            await _fail_stale(current, reason, report)
            return
        await sync_to_async(_notify_job_queued)(row.id, row.queue_name)
        report.resumed.append(str(conversation.pk))
        logger.warning(
            "dead run's job retried", extra={"conversation_id": str(conversation.pk), "job_id": row.id}
        )
        return
    await _requeue_or_fail(current, seconds, max_requeues, report)


async def retry_dead_job(manager: JobManager, job: Job) -> bool:
    """Put back in the queue a `doing` job whose worker is dead; past RUN_MAX_ATTEMPTS, fail it.

    True if it was queued again. A job that keeps killing its worker must not loop forever.
    """
    assert job.id is not None
    if job.attempts + 1 >= RUN_MAX_ATTEMPTS:
        await manager.finish_job_by_id_async(job.id, status=Status.FAILED, delete_job=False)
        logger.error("dead job failed after too many attempts", extra={"job_id": job.id})
        return False
    await manager.retry_job(job)
    return True


def _notify_job_queued(job_id: int, queue: str) -> None:
    """Wake listening workers now: procrastinate notifies inserted jobs, not retried ones."""
    payload = json.dumps({"type": "job_inserted", "job_id": job_id})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_notify('procrastinate_any_queue_v1', %s), pg_notify(%s, %s)",
            [payload, f"procrastinate_queue_v1#{queue}", payload],
        )
