"""Conversations, their messages, ballots, consensus results and event log."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone


class Conversation(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        COMPLETED = "completed"
        NO_CONSENSUS = "no_consensus"
        FAILED = "failed"
        CANCELLED = "cancelled"

    TERMINAL = (Status.COMPLETED, Status.NO_CONSENSUS, Status.FAILED, Status.CANCELLED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    title = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    api_key = models.ForeignKey(
        "gateway.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="conversations"
    )
    owner = models.CharField(
        max_length=64, blank=True, help_text='Who started it: "key:<id>", "user:<id>" or "anonymous".'
    )
    exchanges = models.PositiveIntegerField(default=0, help_text="Questions asked in this conversation.")
    num_agents = models.PositiveSmallIntegerField(default=0)
    turns_requested = models.PositiveSmallIntegerField(default=0)
    turns_completed = models.PositiveSmallIntegerField(default=0)
    consensus_result = models.TextField(blank=True)
    confidence = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.FloatField(default=0.0, help_text="Estimated cost of every exchange, USD.")
    duration = models.FloatField(null=True, blank=True, help_text="Seconds, last exchange.")
    cancel_requested = models.BooleanField(default=False)
    last_seq = models.PositiveIntegerField(default=0, help_text="Sequence number of the last event.")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["-created_at"], name="conv_recent_idx"),
            models.Index(fields=["owner", "-created_at"], name="conv_owner_recent_idx"),
            models.Index(fields=["status", "heartbeat_at"], name="conv_status_hb_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(confidence__isnull=True)
                | (models.Q(confidence__gte=0) & models.Q(confidence__lte=1)),
                name="conversation_confidence_in_unit_interval",
            )
        ]

    def __str__(self) -> str:
        return self.title or str(self.id)

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        AGENT = "agent"

    class Status(models.TextChoices):
        OK = "ok"
        FAILED = "failed"
        ABSTAINED = "abstained"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    exchange = models.PositiveIntegerField(default=1)
    role = models.CharField(max_length=8, choices=Role.choices)
    agent_id = models.CharField(max_length=64, blank=True)
    turn = models.PositiveSmallIntegerField(default=0, help_text="0 for the user's message.")
    content = models.TextField(blank=True, help_text="The clean answer (agents), or the question (user).")
    raw_content = models.TextField(
        blank=True, help_text="The reply as the provider returned it (JSON for a structured reply)."
    )
    position = models.TextField(blank=True, help_text="The agent's short final position, parsed.")
    position_source = models.CharField(
        max_length=16, blank=True, help_text="structured, text, repair or final_sentence; empty if none."
    )
    repair_calls = models.PositiveSmallIntegerField(
        default=0, help_text="Follow-up calls asking for the position (their tokens are included)."
    )
    confidence = models.FloatField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OK)
    error = models.TextField(blank=True)
    provider = models.CharField(max_length=32, blank=True)
    model = models.CharField(max_length=100, blank=True)
    temperature = models.FloatField(null=True, blank=True)
    personality = models.CharField(max_length=64, blank=True)
    simulated = models.BooleanField(default=False)
    latency_ms = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    repair_prompt_tokens = models.PositiveIntegerField(
        default=0, help_text="Of the tokens above, those of the repair call (a resumed run counts them)."
    )
    repair_completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.FloatField(default=0.0, help_text="Estimated cost of this answer, USD.")
    cost_estimated = models.BooleanField(
        default=False, help_text="False when the model has no price (or the answer is simulated)."
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["exchange", "turn", "agent_id", "id"]
        indexes = [
            models.Index(fields=["conversation", "exchange", "turn"], name="msg_conv_turn_idx"),
            models.Index(fields=["created_at"], name="msg_created_idx"),
            models.Index(fields=["model", "created_at"], name="msg_model_idx"),
        ]
        constraints = [
            # One stored answer per agent per turn: a resumed run cannot duplicate it.
            models.UniqueConstraint(
                fields=["conversation", "exchange", "turn", "agent_id"],
                condition=models.Q(role="agent"),
                name="msg_one_answer_per_agent_turn",
            ),
            models.UniqueConstraint(
                fields=["conversation", "exchange"],
                condition=models.Q(role="user"),
                name="msg_one_question_per_exchange",
            ),
        ]

    def __str__(self) -> str:
        who = self.agent_id or self.role
        return f"{who} turn {self.turn}"


class Vote(models.Model):
    """One agent's ballot in the final vote of an exchange."""

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="votes")
    exchange = models.PositiveIntegerField(default=1)
    voter = models.CharField(max_length=64)
    choice = models.CharField(max_length=64, blank=True, help_text="Option label; empty for an abstention.")
    confidence = models.FloatField(null=True, blank=True)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["exchange", "voter"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "exchange", "voter"], name="vote_one_per_voter")
        ]

    def __str__(self) -> str:
        return f"{self.voter} -> {self.choice or 'abstain'}"


class ConsensusResult(models.Model):
    """The decision of one exchange: method, winner, confidence, tie-break and dissent."""

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="results")
    exchange = models.PositiveIntegerField(default=1)
    method = models.CharField(max_length=32)
    reached = models.BooleanField(default=False)
    winner = models.CharField(max_length=64, blank=True)
    answer = models.TextField(blank=True)
    confidence = models.FloatField(default=0.0)
    tie_break = models.CharField(max_length=64, blank=True)
    tallies = models.JSONField(default=dict, blank=True)
    dissent = models.JSONField(default=list, blank=True)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "exchange"], name="result_one_per_exchange"),
            models.CheckConstraint(
                condition=models.Q(confidence__gte=0) & models.Q(confidence__lte=1),
                name="result_confidence_in_unit_interval",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.method}: {self.winner or 'none'} ({self.confidence:.2f})"


class Event(models.Model):
    """The durable, replayable event log of a conversation (one row per WebSocket event)."""

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveIntegerField()
    type = models.CharField(max_length=32)
    data = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["seq"]
        constraints = [models.UniqueConstraint(fields=["conversation", "seq"], name="event_unique_seq")]
        indexes = [models.Index(fields=["created_at"], name="event_created_idx")]

    def __str__(self) -> str:
        return f"{self.conversation_id}#{self.seq} {self.type}"


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
