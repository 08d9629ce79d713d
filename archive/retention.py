"""Retention: delete conversations older than a threshold, with their Redis streams and Qdrant points."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from archive import vectors
from conversations.events import stream_key
from conversations.models import ConsensusResult, Conversation, Event, Message, Vote

logger = logging.getLogger("polyagents.retention")
BATCH = 500
MAX_DAYS = 36500


def _batches(cutoff: datetime) -> Iterator[list[Any]]:
    ids = Conversation.objects.filter(created_at__lt=cutoff).order_by().values_list("pk", flat=True)
    batch: list[Any] = []
    for pk in ids.iterator(chunk_size=BATCH):
        batch.append(pk)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _redis_streams(ids: list[Any], *, dry_run: bool) -> int:
    """Delete (or count) the Redis Streams of these conversations."""
    if not settings.REDIS_URL or not ids:
        return 0
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = [stream_key(pk) for pk in ids]
        return int(client.exists(*keys) if dry_run else client.unlink(*keys))
    finally:
        client.close()


def cleanup(*, days: int, dry_run: bool = False, now: datetime | None = None) -> dict[str, Any]:
    """Remove everything older than `days` days; with dry_run, only count it."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}")
    cutoff = (now or timezone.now()) - timedelta(days=days)
    old = Conversation.objects.filter(created_at__lt=cutoff)
    counts = {
        "conversations": old.count(),
        "messages": Message.objects.filter(conversation__in=old.values("pk")).count(),
        "votes": Vote.objects.filter(conversation__in=old.values("pk")).count(),
        "consensus_results": ConsensusResult.objects.filter(conversation__in=old.values("pk")).count(),
        "events": Event.objects.filter(conversation__in=old.values("pk")).count(),
    }
    deleted_streams = 0
    redis_error = None
    for batch in _batches(cutoff):
        try:
            deleted_streams += _redis_streams(batch, dry_run=dry_run)
        except Exception as exc:  # Redis down: rows still go, the streams expire by STREAM_TTL
            redis_error = f"{type(exc).__name__}: {exc}"[:200]
            logger.exception("redis stream cleanup failed")
        if not dry_run:
            with transaction.atomic():
                Conversation.objects.filter(pk__in=batch).delete()
    redis: dict[str, Any] = {"deleted_streams": deleted_streams, "enabled": bool(settings.REDIS_URL)}
    if redis_error:
        redis["error"] = redis_error
    result = {
        "cleanup_results": {
            "postgresql": counts,
            "redis": redis,
            "qdrant": vectors.delete_older_than(cutoff, dry_run=dry_run),
        },
        "days_threshold": days,
        "dry_run": dry_run,
        "cutoff": cutoff.isoformat().replace("+00:00", "Z"),
    }
    if not dry_run:
        from telemetry.errors import prune_buckets

        prune_buckets()
    logger.info("cleanup done", extra={"days": days, "dry_run": dry_run, **counts})
    return result


def retention_apply(*, days: int | None = None) -> dict[str, Any]:
    """The periodic job: apply RETENTION_DAYS (or `days`)."""
    return cleanup(days=days or settings.CONFIG.RETENTION_DAYS)
