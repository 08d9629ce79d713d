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
            )
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
