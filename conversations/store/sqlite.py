"""The event store on the embedded SQLite database, through the ORM in its one writer thread."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.db import IntegrityError, InterfaceError, OperationalError, close_old_connections, transaction
from django.db.models import F, Max
from django.db.models.functions import Coalesce

from conversations.models import ConsensusResult, Conversation, Event, Message, Vote
from conversations.store.base import (
    BEGIN_MESSAGE_FIELDS,
    CHAT_MESSAGE_FIELDS,
    CHAT_RESULT_FIELDS,
    CHAT_VOTE_FIELDS,
    EventStore,
    ExchangeRows,
    Rows,
    RunStart,
    latest_votes,
)
from conversations.threads import in_pool_thread
from gateway.models import ApiKey

_RESULT_UPDATES = [
    "method",
    "reached",
    "winner",
    "answer",
    "confidence",
    "tie_break",
    "tallies",
    "dissent",
    "details",
]


def _start(conversation: Conversation, question: dict[str, Any]) -> bool:
    with transaction.atomic():
        if (
            conversation.api_key_id is not None
            and ApiKey.objects.filter(pk=conversation.api_key_id, daily_quota__isnull=False).exists()
        ):
            return False
        conversation.save(force_insert=True)
        Message.objects.create(**question)
    return True


def _begin(conversation_id: uuid.UUID, exchange: int, now: datetime) -> RunStart | None:
    with transaction.atomic():
        marked = (
            Conversation.objects.filter(pk=conversation_id, exchanges=exchange)
            .exclude(status__in=Conversation.TERMINAL)
            .update(
                status=Conversation.Status.RUNNING,
                started_at=Coalesce(F("started_at"), now),
                heartbeat_at=now,
            )
        )
        if not marked:
            return None
        conversation = Conversation.objects.get(pk=conversation_id)
        messages = Message.objects.filter(conversation_id=conversation_id, exchange=exchange).order_by(
            "turn", "id"
        )
        earlier = {"conversation_id": conversation_id, "exchange__lt": exchange}
        questions = Message.objects.filter(role=Message.Role.USER, **earlier).order_by("exchange")
        answers = ConsensusResult.objects.filter(**earlier).order_by("exchange")
        last_seq = Event.objects.filter(conversation_id=conversation_id).aggregate(m=Max("seq"))["m"]
        return RunStart(
            conversation,
            list(messages.values(*BEGIN_MESSAGE_FIELDS)),
            [dict(q) for q in questions.values("exchange", "content")],
            [dict(a) for a in answers.values("exchange", "answer")],
            int(last_seq or 0),
        )


def _write(conversation_id: uuid.UUID, batch: list[dict[str, Any]], rows: Rows, now: datetime) -> None:
    with transaction.atomic():
        Event.objects.bulk_create(
            Event(conversation_id=conversation_id, seq=e["seq"], type=e["type"], data=e, created_at=now)
            for e in batch
        )
        # A message already stored by an earlier attempt of the run is kept.
        Message.objects.bulk_create(
            [Message(created_at=now, **m) for m in rows.messages], ignore_conflicts=True
        )
        if rows.votes:
            Vote.objects.bulk_create(
                [Vote(created_at=now, **v) for v in latest_votes(rows.votes)],
                update_conflicts=True,
                unique_fields=["conversation", "exchange", "voter"],
                update_fields=["choice", "confidence", "reason"],
            )
        if rows.result:
            ConsensusResult.objects.bulk_create(
                [ConsensusResult(created_at=now, **rows.result)],
                update_conflicts=True,
                unique_fields=["conversation", "exchange"],
                update_fields=_RESULT_UPDATES,
            )
        fields = {**rows.conversation, "last_seq": batch[-1]["seq"]} if batch else rows.conversation
        if fields:
            Conversation.objects.filter(pk=conversation_id).update(**fields)


def _exchange_rows(conversation_id: uuid.UUID, exchange: int) -> ExchangeRows:
    of_exchange = {"conversation_id": conversation_id, "exchange": exchange}
    messages = Message.objects.filter(role=Message.Role.AGENT, **of_exchange).order_by("turn", "agent_id")
    result = ConsensusResult.objects.filter(**of_exchange).values(*CHAT_RESULT_FIELDS).first()
    votes = Vote.objects.filter(**of_exchange).order_by("voter").values(*CHAT_VOTE_FIELDS)
    return list(messages.values(*CHAT_MESSAGE_FIELDS)), result, list(votes)


class SqliteEventStore(EventStore):
    """Each call is one ORM transaction in the database's one writer thread."""

    lost = (OperationalError, InterfaceError)
    duplicate = IntegrityError

    async def start_conversation(self, conversation: Conversation, question: dict[str, Any]) -> bool:
        return await in_pool_thread(_start, conversation, question)

    async def begin_run(self, conversation_id: uuid.UUID, exchange: int, now: datetime) -> RunStart | None:
        return await in_pool_thread(_begin, conversation_id, exchange, now)

    async def write_batch(
        self,
        conversation_id: uuid.UUID,
        batch: list[dict[str, Any]],
        rows: Rows,
        now: datetime,
        texts: list[str] | None = None,
    ) -> None:
        await in_pool_thread(_write, conversation_id, batch, rows, now)

    async def exchange_rows(self, conversation_id: uuid.UUID, exchange: int) -> ExchangeRows:
        return await in_pool_thread(_exchange_rows, conversation_id, exchange)

    async def reset(self) -> None:
        await sync_to_async(close_old_connections)()
