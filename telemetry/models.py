"""Error records: errors grouped by kind and fingerprint, with per-minute counts per kind."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class ErrorRecord(models.Model):
    """One group of like errors: how often it happened and when first and last."""

    kind = models.CharField(max_length=64)
    fingerprint = models.CharField(max_length=40)
    message = models.TextField()
    context = models.JSONField(default=dict, blank=True, help_text="Context of the latest occurrence.")
    count = models.PositiveIntegerField(default=1)
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "monitoring_errorrecord"  # created by monitoring's migration 0001; kept on the move
        ordering = ["-last_seen"]
        constraints = [models.UniqueConstraint(fields=["kind", "fingerprint"], name="error_record_unique")]
        indexes = [models.Index(fields=["last_seen"], name="error_record_last_seen_idx")]

    def __str__(self) -> str:
        return f"{self.kind}: {self.message[:60]} (x{self.count})"


class ErrorBucket(models.Model):
    """How many errors of one kind happened in one minute; feeds the 24 h and 1 h rates."""

    kind = models.CharField(max_length=64)
    minute = models.DateTimeField(help_text="Start of the minute (UTC).")
    count = models.PositiveIntegerField(default=0)

    class Meta:
        db_table = "monitoring_errorbucket"  # created by monitoring's migration 0001; kept on the move
        constraints = [models.UniqueConstraint(fields=["kind", "minute"], name="error_bucket_unique")]
        indexes = [models.Index(fields=["minute"], name="error_bucket_minute_idx")]

    def __str__(self) -> str:
        return f"{self.kind} @ {self.minute:%Y-%m-%d %H:%M}: {self.count}"
