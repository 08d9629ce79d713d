"""Webhook secrets per API key, the endpoints a 410 disabled, the runs that asked for a webhook,
and every delivery (its id, body, attempts and schedule)."""

from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone


def validate_url(value: str) -> None:
    """The form of a webhook URL (its addresses are checked when used)."""
    from webhooks.safety import UnsafeURL, check_form

    try:
        check_form(value)
    except UnsafeURL as exc:
        raise ValidationError(f"Refused: {exc}.") from None


def new_message_id() -> str:
    """A delivery's `webhook-id`: unique, and the same on every attempt of that delivery."""
    return f"msg_{uuid.uuid4().hex}"


class WebhookKey(models.Model):
    """One API key's webhook settings: its default URL and its `whsec_` signing secret.

    The secret is kept in clear (signing needs it) and shown once, when it is created or rotated.
    During a rotation's grace period the previous secret signs too.
    """

    api_key = models.OneToOneField("gateway.ApiKey", on_delete=models.CASCADE, related_name="webhook")
    default_url = models.CharField(
        max_length=2000,
        blank=True,
        validators=[validate_url],
        help_text="Where this key's /stream runs report when they name no URL.",
    )
    secret = models.CharField(max_length=120, editable=False)
    previous_secret = models.CharField(max_length=120, blank=True, editable=False)
    previous_secret_until = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    rotated_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "webhook key"

    def __str__(self) -> str:
        return f"webhooks of key {self.api_key_id}"

    @property
    def secret_hint(self) -> str:
        return f"{self.secret[:10]}…" if self.secret else ""


class DisabledEndpoint(models.Model):
    """A URL that answered 410 Gone for a key: nothing more is sent there until the row is deleted."""

    api_key = models.ForeignKey("gateway.ApiKey", on_delete=models.CASCADE, related_name="disabled_webhooks")
    url = models.CharField(max_length=2000)
    reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["api_key", "url"], name="disabled_endpoint_once")]

    def __str__(self) -> str:
        return self.url


class RunWebhook(models.Model):
    """A /stream exchange that reports to a webhook: where, and whether each agent turn does too."""

    conversation = models.ForeignKey("conversations.Conversation", on_delete=models.CASCADE)
    exchange = models.PositiveIntegerField()
    api_key = models.ForeignKey("gateway.ApiKey", on_delete=models.CASCADE)
    url = models.CharField(max_length=2000)
    turns = models.BooleanField(default=False, help_text="Also send conversation.agent_turn events.")
    created_at = models.DateTimeField(default=timezone.now)
    # Set once the terminal event's delivery exists (the sweep creates those a lost hook missed).
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "exchange"], name="run_webhook_one_per_exchange")
        ]
        indexes = [models.Index(fields=["finished_at", "created_at"], name="run_webhook_open_idx")]

    def __str__(self) -> str:
        return f"{self.conversation_id} exchange {self.exchange} → {self.url}"


class Delivery(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"
        DISABLED = "disabled"

    id = models.CharField(primary_key=True, max_length=40, default=new_message_id, editable=False)
    run = models.ForeignKey(RunWebhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=64)
    # One delivery per event of a run: a resumed run or a repeated hook adds none.
    dedupe_key = models.CharField(max_length=200, unique=True)
    url = models.CharField(max_length=2000)
    body = models.TextField(help_text="The exact JSON sent on every attempt.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_status = models.PositiveIntegerField(null=True, blank=True, help_text="HTTP status of the last try.")
    last_error = models.CharField(max_length=500, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="delivery_due_idx"),
            models.Index(fields=["-created_at"], name="delivery_recent_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.event} → {self.url} ({self.status})"
