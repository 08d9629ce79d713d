"""The event store's interface: what a conversation's start, its run and its /chat body read
and write, the same on every backend.

A run's event log stages the rows an event stands beside (an agent's message, a ballot, the
exchange's consensus result, conversation fields) and `write_batch` stores them with the
batch's events in one transaction, so an answer is never stored without its event nor an
event without its answer. Rows are given by attname; columns the caller leaves out get the
model's defaults.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from conversations.models import Conversation, Event
from conversations.threads import in_pool_thread

# What a run reads of its exchange's stored messages (by attname), in `turn`, `id` order.
BEGIN_MESSAGE_FIELDS = (
    "id", "role", "turn", "agent_id", "status", "content", "raw_content", "position", "confidence",
    "position_source", "repair_calls", "repair_prompt_tokens", "repair_completion_tokens", "model",
    "provider", "temperature", "latency_ms", "prompt_tokens", "completion_tokens", "simulated", "error",
)  # fmt: skip

# What the /chat body reads of an exchange's rows (by attname).
CHAT_MESSAGE_FIELDS = (
    "agent_id", "turn", "status", "content", "raw_content", "model", "temperature", "provider",
    "personality", "position", "confidence", "position_source", "repair_calls", "latency_ms",
    "prompt_tokens", "completion_tokens", "simulated", "cost_usd", "cost_estimated", "error",
)  # fmt: skip
CHAT_RESULT_FIELDS = (
    "reached",
    "method",
    "winner",
    "confidence",
    "tallies",
    "tie_break",
    "dissent",
    "details",
)
CHAT_VOTE_FIELDS = ("voter", "choice", "confidence", "reason")

ExchangeRows = tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, Any]]]


@dataclass
class Rows:
    """What a batch writes beside its events: agent messages, ballots, an exchange's consensus
    result, conversation fields."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    votes: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    conversation: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.messages or self.votes or self.result or self.conversation)


@dataclass
class RunStart:
    """What a run begins from: its conversation (marked running), the exchange's stored messages
    (BEGIN_MESSAGE_FIELDS, by turn and id), earlier questions and answers, the last stored seq."""

    conversation: Conversation
    messages: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    answers: list[dict[str, Any]]
    last_seq: int


def event_text(event: dict[str, Any]) -> str:
    """An event as compact JSON: what is stored, appended to the Redis Stream and sent to sockets.

    orjson: the same JSON value as the standard library's, far cheaper to encode; non-ASCII
    characters are written as UTF-8 rather than as \\u escapes.
    """
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS).decode()


def latest_votes(votes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ballot per voter of an exchange: the last one given wins, as if written in sequence."""
    latest = {(v["conversation_id"], v["exchange"], v["voter"]): v for v in votes}
    return list(latest.values())


def _stored(conversation_id: uuid.UUID, seqs: list[int]) -> bool:
    return Event.objects.filter(conversation_id=conversation_id, seq__in=seqs).count() == len(seqs)


class EventStore(abc.ABC):
    """One backend of the event store (`conversations.store.event_store()` gives the process's)."""

    # What a statement raises when the connection or the database is gone: a batch is retried.
    lost: tuple[type[BaseException], ...]
    # What a batch raises when an event of it is stored already.
    duplicate: type[BaseException]

    @abc.abstractmethod
    async def start_conversation(self, conversation: Conversation, question: dict[str, Any]) -> bool:
        """Insert a new conversation (its fields as set on the instance) and its question (a
        Message's fields), unless its API key has a daily quota to reserve: False then, and
        nothing is written (the caller's reserving path starts it)."""

    @abc.abstractmethod
    async def begin_run(self, conversation_id: uuid.UUID, exchange: int, now: datetime) -> RunStart | None:
        """Mark a run of the conversation's current exchange running and read what it starts
        from. None when the conversation is missing, finished, or `exchange` is not its current
        one (nothing is written then)."""

    @abc.abstractmethod
    async def write_batch(
        self,
        conversation_id: uuid.UUID,
        batch: list[dict[str, Any]],
        rows: Rows,
        now: datetime,
        texts: list[str] | None = None,
    ) -> None:
        """Store a batch's events (`texts`: each already `event_text`) and its rows, and set the
        conversation's last_seq: all in one transaction. A stored message is kept (one answer per
        agent and turn); a ballot and a result replace the stored ones."""

    @abc.abstractmethod
    async def exchange_rows(self, conversation_id: uuid.UUID, exchange: int) -> ExchangeRows:
        """An exchange's agent messages (CHAT_MESSAGE_FIELDS, by turn and agent), its consensus
        result (CHAT_RESULT_FIELDS, or None) and its ballots (CHAT_VOTE_FIELDS, by voter)."""

    async def batch_stored(self, conversation_id: uuid.UUID, batch: list[dict[str, Any]]) -> bool:
        """Whether every event of the batch is stored (a try committed, its answer was lost)."""
        return await in_pool_thread(_stored, conversation_id, [e["seq"] for e in batch])

    async def reset(self) -> None:  # noqa: B027 (a backend with nothing to drop keeps this)
        """Drop what a lost connection left behind; the next statement connects afresh."""

    async def warm_up(self, rehearsal: Callable[[], Awaitable[None]]) -> None:  # noqa: B027
        """Make the running loop's first statements as fast as later ones (`rehearsal` runs a
        run's statements, rolled back)."""

    async def close(self) -> None:  # noqa: B027
        """Let go of the running loop's connections (tests and process shutdown)."""
