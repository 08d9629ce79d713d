"""What a run's events mean in the database: `RunRecorder` stages the rows an event stands
beside (an agent's message, a ballot, the turn counter) on the run's event log, then emits the
event; the log stores them together, so a client never sees an event that is not stored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from django.utils import timezone

from conversations.events import EventLog, has_watchers
from conversations.models import Conversation, Message
from conversations.signals import agent_turn, send_later
from telemetry.errors import arecord_error


class RunRecorder:
    """Stores what each orchestrator event means, then appends it to the event log."""

    def __init__(self, conversation: Conversation, exchange: int, log: EventLog) -> None:
        self.conversation = conversation
        self.exchange = exchange
        self.log = log
        self.personality: dict[str, str] = {}  # agent_id -> personality, filled at start

    async def __call__(self, type: str, **data: Any) -> dict[str, Any]:
        handler = getattr(self, f"_on_{type}", None)
        if handler is not None:
            await handler(data)
        return await self.log.emit(type, exchange=self.exchange, **data)

    async def _on_agent_response(self, data: dict[str, Any]) -> None:
        tokens = data.get("tokens") or {}
        await self._store_message(
            agent_id=data["agent_id"],
            turn=data["turn"],
            content=data["content"],
            raw_content=data.get("raw_content") or "",
            position=data.get("position") or "",
            position_source=data.get("position_source") or "",
            repair_calls=data.get("repair_calls") or 0,
            confidence=data.get("confidence"),
            status=Message.Status.ABSTAINED if data.get("abstained") else Message.Status.OK,
            provider=data.get("provider", ""),
            model=data.get("model", ""),
            temperature=data.get("temperature"),
            personality=data.get("personality", ""),
            simulated=bool(data.get("simulated")),
            latency_ms=data.get("latency_ms"),
            prompt_tokens=tokens.get("prompt", 0),
            completion_tokens=tokens.get("completion", 0),
            repair_prompt_tokens=(data.get("repair_tokens") or {}).get("prompt", 0),
            repair_completion_tokens=(data.get("repair_tokens") or {}).get("completion", 0),
            cost_usd=data.get("cost_usd") or 0.0,
            cost_estimated=bool(data.get("cost_estimated")),
        )
        if self.conversation.metadata.get("notify_turns"):
            send_later(agent_turn, conversation=self.conversation, exchange=self.exchange, data=data)

    async def _on_agent_error(self, data: dict[str, Any]) -> None:
        await arecord_error(
            "agent_call",
            f"{data.get('kind', 'unknown')}: {data.get('error', '')}",
            agent_id=data["agent_id"],
            model=data.get("model", ""),
            provider=data.get("provider", ""),
            conversation_id=str(self.conversation.pk),
        )
        await self._store_message(
            agent_id=data["agent_id"],
            turn=data["turn"],
            status=Message.Status.FAILED,
            error=f"{data.get('kind', 'unknown')}: {data.get('error', '')}"[:2000],
            provider=data.get("provider", ""),
            model=data.get("model", ""),
            personality=self.personality.get(data["agent_id"], ""),
        )

    async def _store_message(self, **fields: Any) -> None:
        # Written with the event that announces it, in one transaction (a stored one is kept).
        self.log.stage_message({"exchange": self.exchange, "role": Message.Role.AGENT, **fields})

    async def _on_turn_completed(self, data: dict[str, Any]) -> None:
        self.log.stage_conversation(turns_completed=data["turn"], heartbeat_at=timezone.now())

    async def _on_vote(self, data: dict[str, Any]) -> None:
        self.log.stage_vote(
            {
                "exchange": self.exchange,
                "voter": data["voter"],
                "choice": data.get("choice") or "",
                "confidence": data.get("confidence"),
                "reason": (data.get("reason") or "")[:2000],
            }
        )


def _watched_by(log: EventLog) -> Callable[[], Awaitable[bool]]:
    """Asked before each round of a /chat run: whether a WebSocket follows the conversation.
    The log learns it too: while no one watches, agents' responses need not wait for their batch."""

    async def watched() -> bool:
        log.watched = await has_watchers(log.conversation_id)
        return log.watched

    return watched
