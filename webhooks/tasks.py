"""procrastinate tasks of webhooks (workers discover them as `webhooks.tasks`): one delivery
per job, retried by procrastinate at the time the attempt chose, and a sweep that loses nothing."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import attr
from asgiref.sync import sync_to_async
from django.db import close_old_connections
from django.utils import timezone
from procrastinate import RetryDecision, RetryStrategy
from procrastinate.contrib.django import app
from procrastinate.jobs import Job

from conversations.models import Conversation
from webhooks.delivery import ATTEMPT_GRACE, RetryAt, attempt, enqueue
from webhooks.models import Delivery, RunWebhook
from webhooks.services import adeliver_terminal

# A job that fails for another reason (the database is away) is retried this often at most.
UNEXPECTED_MAX_ATTEMPTS = 200
# How long after a run ended its hook has to create the terminal delivery before the sweep does.
HOOK_GRACE = timedelta(seconds=60)


@attr.dataclass(kw_only=True)
class DeliveryRetry(RetryStrategy):
    """The attempt's own schedule (backoff or Retry-After); any other error (the database is
    away): 5-30 s later, at most `max_attempts` times."""

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, RetryAt):
            return RetryDecision(retry_at=exception.when)
        if self.max_attempts is not None and job.attempts >= self.max_attempts:
            return None
        return RetryDecision(retry_in={"seconds": int(random.uniform(5, 30))})


@app.task(name="webhooks.deliver", retry=DeliveryRetry(max_attempts=UNEXPECTED_MAX_ATTEMPTS))
async def deliver(delivery_id: str) -> None:
    """One attempt of a delivery; raises RetryAt when another is due."""
    await sync_to_async(close_old_connections)()
    try:
        when = await attempt(delivery_id)
    finally:
        await sync_to_async(close_old_connections)()
    if when is not None:
        raise RetryAt(when)


@app.periodic(cron="* * * * *")
@app.task(name="webhooks.sweep", queueing_lock="webhooks.sweep")
async def sweep(timestamp: int) -> dict[str, Any]:
    """Every minute: the terminal deliveries a lost hook never created, and the pending
    deliveries whose job was lost (a worker killed for good), queued again with the same id."""
    await sync_to_async(close_old_connections)()
    try:
        return await sweep_once()
    finally:
        await sync_to_async(close_old_connections)()


async def sweep_once() -> dict[str, int]:
    now = timezone.now()
    created = 0
    runs = RunWebhook.objects.filter(
        finished_at__isnull=True,
        conversation__status__in=Conversation.TERMINAL,
        conversation__completed_at__lt=now - HOOK_GRACE,
    ).select_related("conversation")
    async for run in runs[:500]:
        if await adeliver_terminal(run, run.conversation, agreement=None) is not None:
            created += 1
    requeued = 0
    overdue = Delivery.objects.filter(status=Delivery.Status.PENDING, next_attempt_at__lt=now - ATTEMPT_GRACE)
    async for delivery_id in overdue.values_list("pk", flat=True)[:500]:
        await enqueue(delivery_id)  # a job still queued for it keeps its queueing lock: no double
        requeued += 1
    return {"terminal_created": created, "requeued": requeued}
