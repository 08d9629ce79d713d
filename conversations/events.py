"""The event log of a conversation: store first, then publish.

Every event gets the next `seq` of its conversation, is written as an `Event` row, and
only then is pushed to the conversation's Channels group. One `EventLog` instance
belongs to the single run that drives a conversation, so `seq` is assigned in order
without a database round trip.
"""

from __future__ import annotations

import uuid
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.db.models import Max
from django.utils import timezone

from conversations.models import Conversation, Event


def group_name(conversation_id: uuid.UUID | str) -> str:
    return f"conv.{conversation_id}"


def stream_key(conversation_id: uuid.UUID | str) -> str:
    """The Redis Stream holding a conversation's events (REDIS_URL deployments)."""
    return f"{settings.REDIS_KEY_PREFIX}:stream:{conversation_id}"


class EventLog:
    def __init__(self, conversation_id: uuid.UUID, last_seq: int = 0) -> None:
        self.conversation_id = conversation_id
        self.last_seq = last_seq

    @classmethod
    async def open(cls, conversation_id: uuid.UUID) -> EventLog:
        """Continue the log of a conversation after its last stored event."""
        result = await Event.objects.filter(conversation_id=conversation_id).aaggregate(m=Max("seq"))
        return cls(conversation_id, result["m"] or 0)

    async def emit(self, type: str, **data: Any) -> dict[str, Any]:
        self.last_seq += 1
        now = timezone.now()
        event = {
            "type": type,
            "conversation_id": str(self.conversation_id),
            "seq": self.last_seq,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            **data,
        }
        await Event.objects.acreate(
            conversation_id=self.conversation_id, seq=self.last_seq, type=type, data=event, created_at=now
        )
        await Conversation.objects.filter(pk=self.conversation_id).aupdate(last_seq=self.last_seq)
        layer = get_channel_layer()
        if layer is not None:
            await layer.group_send(
                group_name(self.conversation_id), {"type": "conversation.event", "event": event}
            )
        return event
