"""API keys, security events and blocked IPs."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.db import models
from django.utils import timezone

KEY_PREFIX = "pk_"


def hash_key(raw_key: str) -> str:
    """SHA-256 of a key: fast enough for every request, safe for 256-bit random keys."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new key: recognisable prefix plus 256 bits of entropy."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class QuotaUnit(models.TextChoices):
    TOKENS = "tokens"
    USD = "usd"


class ApiKey(models.Model):
    class Source(models.TextChoices):
        MANUAL = "manual"
        ENV = "env"
        DEMO = "demo"
        ROTATION = "rotation"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="First characters of the key, for recognition.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    permissions = models.JSONField(default=list)
    rate_limit_override = models.PositiveIntegerField(null=True, blank=True)
    daily_quota = models.FloatField(
        null=True, blank=True, help_text="Tokens or USD per UTC day (see the unit); empty means no quota."
    )
    daily_quota_unit = models.CharField(max_length=8, choices=QuotaUnit.choices, default=QuotaUnit.TOKENS)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.MANUAL)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    replaced_by = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replaces"
    )

    class Meta:
        indexes = [models.Index(fields=["created_at"])]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(rate_limit_override__isnull=True) | models.Q(rate_limit_override__gt=0),
                name="apikey_rate_limit_override_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(daily_quota__isnull=True) | models.Q(daily_quota__gt=0),
                name="apikey_daily_quota_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def is_usable(self, now: datetime | None = None) -> bool:
        now = now or timezone.now()
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > now

    def has_permission(self, permission: str) -> bool:
        return permission in self.permissions or "admin" in self.permissions


class SecurityEvent(models.Model):
    class Kind(models.TextChoices):
        AUTH_FAILED = "auth_failed"
        PERMISSION_DENIED = "permission_denied"
        RATE_LIMITED = "rate_limited"
        IP_BLOCKED = "ip_blocked"
        BLOCKED_REQUEST = "blocked_request"
        IP_UNBLOCKED = "ip_unblocked"
        KEY_CREATED = "key_created"
        KEY_REVOKED = "key_revoked"
        KEY_ROTATED = "key_rotated"

    kind = models.CharField(max_length=32, choices=Kind.choices)
    ip = models.GenericIPAddressField(null=True, blank=True)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL)
    path = models.CharField(max_length=500, blank=True)
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["created_at"]),
            models.Index(fields=["kind", "created_at"]),
            models.Index(fields=["ip", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.kind} from {self.ip} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class BlockedIP(models.Model):
    ip = models.GenericIPAddressField(unique=True)
    reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty means blocked until lifted.")

    class Meta:
        verbose_name = "blocked IP"
        indexes = [models.Index(fields=["expires_at"])]

    def __str__(self) -> str:
        return self.ip

    def is_active(self, now: datetime | None = None) -> bool:
        now = now or timezone.now()
        return self.expires_at is None or self.expires_at > now

    @classmethod
    def block_for(cls, ip: str, seconds: int, reason: str) -> BlockedIP:
        obj, _ = cls.objects.update_or_create(
            ip=ip, defaults={"reason": reason, "expires_at": timezone.now() + timedelta(seconds=seconds)}
        )
        return obj


class QuotaUsage(models.Model):
    """What one key spent on one UTC day: settled usage, and open reservations when Redis is absent."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="quota_usage")
    day = models.DateField()
    used = models.FloatField(default=0.0, help_text="Actual usage of finished conversations.")
    reserved = models.FloatField(
        default=0.0, help_text="Estimates held by running conversations (database fallback only)."
    )
    unit = models.CharField(max_length=8, choices=QuotaUnit.choices, default=QuotaUnit.TOKENS)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "quota usage"
        verbose_name_plural = "quota usage"
        constraints = [models.UniqueConstraint(fields=["api_key", "day"], name="quota_usage_one_per_day")]
        indexes = [models.Index(fields=["day"], name="quota_usage_day_idx")]

    def __str__(self) -> str:
        return f"{self.api_key_id} {self.day}: {self.used:g} {self.unit}"
