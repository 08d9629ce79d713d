"""One delivery attempt, and when the next one is due.

On PostgreSQL each delivery is a procrastinate job (webhooks/tasks.py) that makes one attempt
and, when it must try again, raises `RetryAt` so procrastinate schedules the same job again:
a killed worker's job is put back by the stalled-job sweep, and the delivery keeps its id.
On the embedded SQLite default the same attempts run in an asyncio task of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from django.conf import settings
from django.utils import timezone

from webhooks import signing
from webhooks.models import Delivery, DisabledEndpoint, WebhookKey
from webhooks.safety import Target, UnsafeURL, resolve

logger = logging.getLogger("polyagents.webhooks")

# The longest Retry-After honoured; a longer one waits this long.
MAX_RETRY_AFTER = 86400.0
# Statuses whose Retry-After header sets the next try.
RETRY_AFTER_STATUSES = (429, 503)
# After this long past its due time, a pending delivery with no job is queued again (tasks.sweep).
ATTEMPT_GRACE = timedelta(seconds=60)
USER_AGENT = "PolyAgents-Webhooks/1"

_in_process: set[asyncio.Task[None]] = set()


class RetryAt(Exception):
    """Raised by a delivery job whose attempt failed: procrastinate runs it again at `when`."""

    def __init__(self, when: datetime) -> None:
        super().__init__(f"webhook delivery retried at {when.isoformat()}")
        self.when = when


@dataclass(frozen=True)
class Answer:
    """What one attempt got: an HTTP status (and Retry-After), or an error."""

    status: int | None = None
    retry_after: str | None = None
    error: str = ""


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: x4 each time, capped, jittered.

    With the defaults (5 s, capped at 10 h, 10 attempts) the tries span 21-28 hours.
    """
    config = settings.CONFIG
    step = min(config.WEBHOOK_RETRY_MAX_WAIT, config.WEBHOOK_RETRY_WAIT * 4 ** max(0, attempts - 1))
    return random.uniform(step * 0.75, step)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds from now, or None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(MAX_RETRY_AFTER, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(MAX_RETRY_AFTER, max(0.0, (when - timezone.now()).total_seconds()))


def secrets_of(hook_key: WebhookKey, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, and the previous one during its grace period."""
    found = [hook_key.secret]
    if hook_key.previous_secret and hook_key.previous_secret_until and hook_key.previous_secret_until > now:
        found.append(hook_key.previous_secret)
    return found


async def post(target: Target, message_id: str, body: bytes, secrets: list[str]) -> Answer:
    """POST the body to the checked address (never following a redirect), within WEBHOOK_TIMEOUT."""
    url = httpx.URL(target.url)
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "host": url.netloc.decode("ascii"),
        **signing.headers(secrets, message_id, int(time.time()), body),
    }
    timeout = settings.CONFIG.WEBHOOK_TIMEOUT
    try:
        async with asyncio.timeout(timeout):
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                request = client.build_request(
                    "POST", url.copy_with(host=target.address), content=body, headers=headers,
                    extensions={"sni_hostname": target.host},
                )  # fmt: skip
                response = await client.send(request, stream=True)
                await response.aclose()
    except TimeoutError:
        return Answer(error=f"no answer within {timeout:g} s")
    except httpx.HTTPError as exc:
        return Answer(error=f"{type(exc).__name__}: {exc}"[:500])
    return Answer(status=response.status_code, retry_after=response.headers.get("retry-after"))


async def _close(delivery: Delivery, status: str, error: str = "") -> None:
    delivery.status = status
    delivery.next_attempt_at = None
    delivery.last_error = error[:500]
    if status == Delivery.Status.DELIVERED:
        delivery.delivered_at = timezone.now()
    await delivery.asave(update_fields=["status", "next_attempt_at", "last_error", "delivered_at"])


async def attempt(delivery_id: str) -> datetime | None:
    """Make one attempt of a pending delivery; returns when to try again, or None when it is over."""
    delivery = await Delivery.objects.select_related("run").filter(pk=delivery_id).afirst()
    if delivery is None or delivery.status != Delivery.Status.PENDING:
        return None
    key_id = delivery.run.api_key_id
    if await DisabledEndpoint.objects.filter(api_key_id=key_id, url=delivery.url).aexists():
        await _close(delivery, Delivery.Status.DISABLED, "endpoint disabled (it answered 410 Gone)")
        return None
    hook_key = await WebhookKey.objects.filter(api_key_id=key_id).afirst()
    if hook_key is None:
        await _close(delivery, Delivery.Status.FAILED, "the API key has no webhook secret any more")
        return None
    # Counted before the call, so a worker killed during it still counts it; if this attempt
    # dies with its worker, the delivery is due again after the timeout and a grace period.
    delivery.attempts += 1
    delivery.next_attempt_at = (
        timezone.now() + timedelta(seconds=settings.CONFIG.WEBHOOK_TIMEOUT) + ATTEMPT_GRACE
    )
    await delivery.asave(update_fields=["attempts", "next_attempt_at"])
    try:
        target = await resolve(delivery.url)
    except UnsafeURL as exc:
        await _close(delivery, Delivery.Status.FAILED, f"refused: {exc}")
        return None
    answer = await post(target, delivery.pk, delivery.body.encode(), secrets_of(hook_key, timezone.now()))
    return await _record(delivery, answer)


async def _record(delivery: Delivery, answer: Answer) -> datetime | None:
    delivery.last_status = answer.status
    await delivery.asave(update_fields=["last_status"])
    status = answer.status
    if status is not None and 200 <= status < 300:
        await _close(delivery, Delivery.Status.DELIVERED)
        return None
    if status == 410:
        await DisabledEndpoint.objects.aget_or_create(
            api_key_id=delivery.run.api_key_id, url=delivery.url, defaults={"reason": "410 Gone"}
        )
        await _close(delivery, Delivery.Status.DISABLED, "410 Gone: endpoint disabled")
        return None
    error = answer.error or f"HTTP {status}"
    if delivery.attempts >= settings.CONFIG.WEBHOOK_MAX_ATTEMPTS:
        await _close(delivery, Delivery.Status.FAILED, f"{error}; gave up after {delivery.attempts} attempts")
        return None
    wait = retry_after_seconds(answer.retry_after) if status in RETRY_AFTER_STATUSES else None
    when = timezone.now() + timedelta(seconds=backoff(delivery.attempts) if wait is None else wait)
    delivery.next_attempt_at, delivery.last_error = when, error[:500]
    await delivery.asave(update_fields=["next_attempt_at", "last_error"])
    logger.info(
        "webhook delivery retried", extra={"delivery": delivery.pk, "error": error, "at": when.isoformat()}
    )
    return when


async def deliver_in_process(delivery_id: str) -> None:
    """The embedded default: every attempt of a delivery, in this process."""
    while True:
        try:
            when = await attempt(delivery_id)
        except Exception:
            logger.exception("webhook delivery crashed", extra={"delivery": delivery_id})
            when = timezone.now() + timedelta(seconds=backoff(1))
        if when is None:
            return
        await asyncio.sleep(max(0.0, (when - timezone.now()).total_seconds()))


async def enqueue(delivery_id: str, *, at: datetime | None = None) -> None:
    """Start delivering: a procrastinate job on PostgreSQL, an asyncio task on SQLite."""
    if settings.USING_POSTGRES:
        from procrastinate.exceptions import AlreadyEnqueued

        from webhooks.tasks import deliver

        lock = f"webhook:{delivery_id}"
        with contextlib.suppress(AlreadyEnqueued):  # queued already (the sweep, a redelivery)
            await deliver.configure(lock=lock, queueing_lock=lock, schedule_at=at).defer_async(
                delivery_id=delivery_id
            )
        return
    task = asyncio.get_running_loop().create_task(deliver_in_process(delivery_id))
    _in_process.add(task)
    task.add_done_callback(_in_process.discard)


async def wait_for_in_process(timeout: float) -> None:
    """Wait for this process's deliveries to end (tests)."""
    if _in_process:
        await asyncio.wait(set(_in_process), timeout=timeout)
