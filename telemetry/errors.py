"""Error tracking: group errors by kind and fingerprint, count them per minute.

`record_error` never raises: tracking an error must not cause another one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from telemetry.models import ErrorBucket, ErrorRecord

logger = logging.getLogger("polyagents.errors")

_VOLATILE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|0x[0-9a-f]+|\d+(?:\.\d+)?", re.IGNORECASE
)
BUCKET_RETENTION = timedelta(hours=48)


def fingerprint(kind: str, message: str) -> str:
    """A stable group key: the message with ids and numbers blanked out, hashed with the kind."""
    normalised = _VOLATILE.sub("#", message.strip())[:500]
    return hashlib.sha1(f"{kind}\n{normalised}".encode(), usedforsecurity=False).hexdigest()


def _jsonable(context: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value if isinstance(value, str | int | float | bool | None) else str(value)
        for key, value in context.items()
    }


def _increment(
    model: type[ErrorRecord] | type[ErrorBucket],
    lookup: dict[str, Any],
    updates: dict[str, Any],
    create: dict[str, Any],
) -> None:
    """Upsert: increment an existing row with F(), or create it (retrying once on a race)."""
    for _ in range(2):
        if model.objects.filter(**lookup).update(count=F("count") + 1, **updates):
            return
        try:
            with transaction.atomic():
                model.objects.create(**lookup, **create)
            return
        except IntegrityError:
            continue  # another process created it first: increment that row


def record_error(kind: str, message: str, **context: Any) -> None:
    """Count one error of `kind` (e.g. "agent_call", "chat_conversation") and log it."""
    now = timezone.now()
    message = str(message)[:2000] or "(no message)"
    logger.warning(
        "error recorded", extra={"error_kind": kind, "error_message": message, **_jsonable(context)}
    )
    try:
        _increment(
            ErrorRecord,
            {"kind": kind[:64], "fingerprint": fingerprint(kind, message)},
            {"last_seen": now, "message": message, "context": _jsonable(context)},
            {"message": message, "context": _jsonable(context), "first_seen": now, "last_seen": now},
        )
        minute = now.replace(second=0, microsecond=0)
        _increment(ErrorBucket, {"kind": kind[:64], "minute": minute}, {}, {"count": 1})
    except Exception:  # the database being down must not turn one failure into two
        logger.exception("could not record error", extra={"error_kind": kind})


async def arecord_error(kind: str, message: str, **context: Any) -> None:
    """Async twin of `record_error`."""
    await sync_to_async(record_error)(kind, message, **context)


def error_rates(now: datetime | None = None) -> dict[str, dict[str, float | int]]:
    """Per kind: errors in the last 24 h, and errors per minute averaged over the last hour."""
    now = now or timezone.now()
    day_ago, hour_ago = now - timedelta(hours=24), now - timedelta(hours=1)
    rows = (
        ErrorBucket.objects.filter(minute__gt=day_ago)
        .values("kind")
        .annotate(total_24h=Sum("count"), total_1h=Sum("count", filter=Q(minute__gt=hour_ago)))
        .order_by("kind")
    )
    return {
        row["kind"]: {"total_24h": row["total_24h"] or 0, "rate_1h": round((row["total_1h"] or 0) / 60, 4)}
        for row in rows
    }


def prune_buckets(now: datetime | None = None) -> int:
    """Delete per-minute buckets older than the 48 h they are needed for."""
    now = now or timezone.now()
    deleted, _ = ErrorBucket.objects.filter(minute__lt=now - BUCKET_RETENTION).delete()
    return deleted
