"""What a run begins from: its conversation marked running, the answers its exchange stored
already (a resumed run reuses them), the earlier exchanges (`EventStore.begin_run`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from agents.orchestrator import AgentResult
from agents.providers.base import Usage
from consensus import Proposal, parse_reply
from conversations.errors import ConversationError
from conversations.models import Conversation, Message
from conversations.store import Rows, event_store


def _prior(messages: list[dict[str, Any]]) -> tuple[str, dict[int, dict[str, AgentResult]]]:
    """The exchange's question and the answers its earlier attempts stored, by turn and agent."""
    question = ""
    prior: dict[int, dict[str, AgentResult]] = {}
    for m in messages:
        if m["role"] == Message.Role.USER:
            question = m["content"]
            continue
        ok = m["status"] != Message.Status.FAILED
        proposal = None
        if m["status"] == Message.Status.OK and m["raw_content"] and m["position"]:
            # Stored with its parsed position (a structured or repaired reply may not parse as text).
            proposal = Proposal(m["agent_id"], m["content"], m["position"], m["confidence"])
        elif ok and not m["raw_content"]:
            proposal = parse_reply(m["agent_id"], m["content"])  # a row from before raw_content
        prior.setdefault(m["turn"], {})[m["agent_id"]] = AgentResult(
            agent_id=m["agent_id"],
            turn=m["turn"],
            ok=ok,
            text=m["raw_content"] or m["content"],
            proposal=proposal,
            answer=m["content"] if m["raw_content"] else "",
            position_source=m["position_source"],
            repair_calls=m["repair_calls"],
            repair_usage=Usage(m["repair_prompt_tokens"], m["repair_completion_tokens"]),
            model=m["model"],
            provider=m["provider"],
            temperature=m["temperature"] or 0.0,
            latency_ms=m["latency_ms"] or 0.0,
            usage=Usage(m["prompt_tokens"], m["completion_tokens"]),
            simulated=m["simulated"],
            error=m["error"],
            error_kind=m["error"].split(":", 1)[0] if m["error"] else "",
        )
    return question, prior


def _history(questions: dict[int, str], answers: dict[int, str]) -> list[tuple[str, str]]:
    """Earlier exchanges as (question, answer), oldest first (no answer: an empty one)."""
    return [(questions[n], answers.get(n, "")) for n in sorted(questions)]


@dataclass
class _Begun:
    conversation: Conversation
    question: str = ""
    prior: dict[int, dict[str, AgentResult]] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)
    last_seq: int = 0


def _mark_running(conversation: Conversation, now: datetime) -> None:
    """The fields a run's begin sets (not saved)."""
    conversation.status = Conversation.Status.RUNNING
    conversation.started_at = conversation.started_at or now
    conversation.heartbeat_at = now


async def _abegin(conversation_id: uuid.UUID, exchange: int) -> _Begun:
    """Mark the run running and read what it starts from (`EventStore.begin_run`). A missing
    conversation raises DoesNotExist, a stale exchange ConversationError; a finished one is
    returned as it is."""
    read = await event_store().begin_run(conversation_id, exchange, timezone.now())
    if read is not None:
        question, prior = _prior(read.messages)
        asked = {q["exchange"]: q["content"] for q in read.questions}
        history = _history(asked, {a["exchange"]: a["answer"] for a in read.answers})
        return _Begun(read.conversation, question, prior, history, read.last_seq)
    conversation = await Conversation.objects.aget(pk=conversation_id)
    if exchange != conversation.exchanges or not conversation.is_terminal:
        raise ConversationError(f"exchange {exchange} is not the current one ({conversation.exchanges})")
    return _Begun(conversation)


async def rehearse_run() -> None:
    """A run's calls on the event store, once, for a throwaway conversation: its start, its
    begin, a batch with a message, a ballot, a result and an event, and the /chat body's read
    (the warm-up of a process runs it and rolls it back: `EventStore.warm_up`)."""
    conversation_id, now = uuid.uuid4(), timezone.now()
    one = {"conversation_id": conversation_id, "exchange": 1}
    conversation = Conversation(id=conversation_id, exchanges=1, created_at=now, updated_at=now)
    store = event_store()
    await store.start_conversation(conversation, {**one, "role": Message.Role.USER, "content": "warm-up"})
    await store.begin_run(conversation_id, 1, now)
    rows = Rows(
        messages=[{**one, "role": Message.Role.AGENT, "agent_id": "a", "turn": 1}],
        votes=[{**one, "voter": "a", "choice": "A"}],
        result={**one, "method": "majority"},
        conversation={"turns_completed": 1},
    )
    event = {"type": "warm_up", "conversation_id": str(conversation_id), "seq": 1}
    await store.write_batch(conversation_id, [event], rows, now)
    await store.exchange_rows(conversation_id, 1)
