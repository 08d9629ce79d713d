"""Export of conversations as JSON, JSON Lines or CSV, streamed in chunks."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Prefetch
from django.utils import timezone

from conversations.models import Conversation, Message
from conversations.selectors import conversation_summary, message_body

FORMATS = {
    "json": ("application/json", "json"),
    "jsonl": ("application/x-ndjson", "jsonl"),
    "csv": ("text/csv; charset=utf-8", "csv"),
}
CHUNK = 200
MAX_DAYS = 36500
CSV_COLUMNS = [
    "conversation_id",
    "created_at",
    "status",
    "title",
    "exchange",
    "role",
    "agent_id",
    "turn",
    "model",
    "temperature",
    "message_status",
    "latency_ms",
    "content",
    "consensus_result",
    "confidence",
]


def _conversations(days: int, now: datetime | None = None) -> Iterator[Conversation]:
    since = (now or timezone.now()) - timedelta(days=days)
    queryset = (
        Conversation.objects.filter(created_at__gte=since)
        .order_by("created_at", "pk")
        .prefetch_related(
            Prefetch("messages", queryset=Message.objects.order_by("exchange", "turn", "agent_id", "id"))
        )
    )
    yield from queryset.iterator(chunk_size=CHUNK)


def _record(conversation: Conversation) -> dict[str, Any]:
    return {
        **conversation_summary(conversation),
        "owner": conversation.owner,
        "messages": [message_body(m) for m in conversation.messages.all()],
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, cls=DjangoJSONEncoder, ensure_ascii=False)


def _csv_line(row: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue()


def _csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formulas (CSV injection) in text cells."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def iter_export(fmt: str, days: int, now: datetime | None = None) -> Iterator[str]:
    """Yield the export piece by piece; the database is read CHUNK conversations at a time."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}")
    if fmt == "json":
        yield f'{{"days": {days}, "conversations": ['
        for index, conversation in enumerate(_conversations(days, now)):
            yield ("," if index else "") + "\n" + _dumps(_record(conversation))
        yield "\n]}\n"
    elif fmt == "jsonl":
        for conversation in _conversations(days, now):
            yield _dumps(_record(conversation)) + "\n"
    else:
        yield _csv_line(CSV_COLUMNS)
        for conversation in _conversations(days, now):
            head = [
                str(conversation.pk),
                conversation.created_at.isoformat(),
                conversation.status,
                conversation.title,
            ]
            tail = [conversation.consensus_result, conversation.confidence]
            for m in conversation.messages.all():
                row = [
                    *head,
                    m.exchange,
                    m.role,
                    m.agent_id,
                    m.turn,
                    m.model,
                    m.temperature,
                    m.status,
                    m.latency_ms,
                    m.content,
                    *tail,
                ]
                yield _csv_line([_csv_safe(v) for v in row])


def filename(fmt: str, now: datetime | None = None) -> str:
    stamp = (now or timezone.now()).strftime("%Y%m%dT%H%M%SZ")
    return f"polyagents-conversations-{stamp}.{FORMATS[fmt][1]}"
