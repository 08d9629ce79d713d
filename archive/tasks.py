"""procrastinate task of the archive: the daily retention run (workers discover it as `archive.tasks`)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from procrastinate.contrib.django import app

from archive.retention import retention_apply


@app.periodic(cron="17 3 * * *")
@app.task(name="archive.retention", queueing_lock="archive.retention")
async def retention(timestamp: int) -> dict[str, Any]:
    """Daily: delete what is older than RETENTION_DAYS (database, Redis streams, Qdrant)."""
    return await sync_to_async(_apply)(settings.CONFIG.RETENTION_DAYS)


def _apply(days: int) -> dict[str, Any]:
    """Run in a worker thread with a live connection: one broken by a database restart is replaced."""
    close_old_connections()
    try:
        return retention_apply(days=days)
    finally:
        close_old_connections()
