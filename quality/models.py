"""Labelled outcomes: users say whether a panel's answer was right (used to recalibrate confidence)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Feedback(models.Model):
    """Whether the answer of one exchange was right, as judged by its owner or an admin (one per exchange)."""

    conversation = models.ForeignKey(
        "conversations.Conversation", on_delete=models.CASCADE, related_name="feedback"
    )
    exchange = models.PositiveIntegerField(default=1)
    correct = models.BooleanField()
    note = models.TextField(blank=True)
    author = models.CharField(max_length=64, blank=True, help_text='"key:<id>", "user:<id>" or "anonymous".')
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "exchange"], name="feedback_one_per_exchange")
        ]

    def __str__(self) -> str:
        return f"{self.conversation_id}#{self.exchange}: {'right' if self.correct else 'wrong'}"
