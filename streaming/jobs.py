"""Running conversations in the background, and sweeping the ones whose run died.

On PostgreSQL a run is a procrastinate job (`streaming.tasks.run_conversation`) that
any `manage.py procrastinate worker` on any machine picks up; on the embedded SQLite
default it is an asyncio task of the web process.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from conversations.events import EventLog
from conversations.models import Conversation

logger = logging.getLogger("polyagents.jobs")

# Strong references to in-process runs, so the event loop does not garbage-collect them.
_background: set[asyncio.Task[None]] = set()

SWEEP_MAX_REQUEUES = 2


def job_lock(conversation_id: uuid.UUID | str) -> str:
    """The procrastinate lock of a conversation: never two runs of it at once, never two queued."""
    return f"conversation:{conversation_id}"


async def enqueue_run(conversation_id: uuid.UUID, exchange: int) -> str:
    """Start running an exchange in the background: "procrastinate", "already_queued" or "in_process"."""
    if settings.USING_POSTGRES:
        from procrastinate.exceptions import AlreadyEnqueued

        from streaming.tasks import run_conversation

        lock = job_lock(conversation_id)
        try:
            await run_conversation.configure(lock=lock, queueing_lock=lock).defer_async(
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
    """The SQLite path: sweep runs a previous process left behind, then run this exchange."""
    from conversations.services import conversation_run

    try:
        await sweep_stale_conversations(requeue=False)
    except Exception:
        logger.exception("stale sweep failed")
    try:
        await conversation_run(conversation_id=conversation_id, exchange=exchange)
    except Exception:
        # conversation_run records its own failures; this only keeps the task from dying silently.
        logger.exception("in-process run crashed", extra={"conversation_id": str(conversation_id)})


async def wait_for_background_runs(timeout: float | None = None) -> None:
    """Wait for the in-process runs of this event loop (tests and graceful shutdown)."""
    loop = asyncio.get_running_loop()
    tasks = [task for task in _background if task.get_loop() is loop]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def fail_conversation(conversation: Conversation, reason: str) -> None:
    """Mark a dead run failed, with its reason, and tell the followers."""
    updated = await Conversation.objects.filter(
        pk=conversation.pk, status__in=[Conversation.Status.RUNNING, Conversation.Status.PENDING]
    ).aupdate(status=Conversation.Status.FAILED, error=reason, completed_at=timezone.now())
    if updated:
        log = await EventLog.open(conversation.pk)
        await log.emit("conversation_failed", status="failed", reason=reason, exchange=conversation.exchanges)


async def sweep_stale_conversations(
    *, older_than: float | None = None, requeue: bool | None = None, max_requeues: int = SWEEP_MAX_REQUEUES
) -> SweepReport:
    """Find "running" conversations with an old heartbeat: re-enqueue them (bounded) or fail them.

    `requeue` defaults to True on PostgreSQL (a worker resumes from the last completed
    turn); in-process runs cannot be handed over, so there they are failed.
    """
    seconds = settings.CONVERSATION_STALE_SECONDS if older_than is None else older_than
    requeue = settings.USING_POSTGRES if requeue is None else requeue
    cutoff = timezone.now() - timedelta(seconds=seconds)
    # Running with an old heartbeat. With requeueing (PostgreSQL) also pending ones whose job
    # may be lost: re-enqueueing a job that is still queued is a no-op (queueing lock).
    statuses = [Conversation.Status.RUNNING]
    if requeue:
        statuses.append(Conversation.Status.PENDING)
    stale = Conversation.objects.filter(status__in=statuses).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, updated_at__lt=cutoff)
    )
    report = SweepReport()
    async for conversation in stale:
        attempts = int(conversation.metadata.get("sweep_requeues", 0))
        if requeue and attempts < max_requeues:
            metadata = {**conversation.metadata, "sweep_requeues": attempts + 1}
            # Touch the heartbeat so the next sweep gives the new run time to start.
            await Conversation.objects.filter(pk=conversation.pk).aupdate(
                metadata=metadata, heartbeat_at=timezone.now()
            )
            if await enqueue_run(conversation.pk, conversation.exchanges) == "already_queued":
                # Its job is still waiting for a worker: not a lost run, so no attempt is spent.
                await Conversation.objects.filter(pk=conversation.pk).aupdate(metadata=conversation.metadata)
                continue
            report.requeued.append(str(conversation.pk))
            logger.warning("stale conversation re-enqueued", extra={"conversation_id": str(conversation.pk)})
        else:
            reason = f"worker lost: no heartbeat for {seconds:g}s"
            if requeue:
                reason += f" after {attempts} re-enqueue(s)"
            await fail_conversation(conversation, reason)
            report.failed.append(str(conversation.pk))
            logger.warning("stale conversation failed", extra={"conversation_id": str(conversation.pk)})
    return report
