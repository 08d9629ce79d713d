"""Reads of conversations for the history endpoints, scoped to what a principal may see."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet

from conversations.models import ConsensusResult, Conversation, Message, Vote
from conversations.store import CHAT_MESSAGE_FIELDS as CHAT_MESSAGE_FIELDS  # the /chat body's fields
from conversations.store import CHAT_RESULT_FIELDS as CHAT_RESULT_FIELDS
from conversations.store import CHAT_VOTE_FIELDS as CHAT_VOTE_FIELDS
from conversations.store import event_store
from gateway.principal import Principal


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def visible_conversations(principal: Principal) -> QuerySet[Conversation]:
    """Every conversation for an admin; only the principal's own for anyone else."""
    queryset = Conversation.objects.all()
    if not principal.is_admin:
        queryset = queryset.filter(owner=principal.owner)
    return queryset


def conversation_summary(conversation: Conversation) -> dict[str, Any]:
    return {
        "conversation_id": str(conversation.pk),
        "title": conversation.title,
        "status": conversation.status,
        "num_agents": conversation.num_agents,
        "turns_requested": conversation.turns_requested,
        "turns_completed": conversation.turns_completed,
        "exchanges": conversation.exchanges,
        "consensus_result": conversation.consensus_result,
        "confidence": conversation.confidence,
        "duration": conversation.duration,
        "cost_usd": round(conversation.cost_usd, 8),
        "created_at": _iso(conversation.created_at),
        "completed_at": _iso(conversation.completed_at),
    }


def recent_conversations(
    principal: Principal, limit: int, *, status: str | None = None
) -> list[dict[str, Any]]:
    """The newest conversations the principal may see (only `status` ones if given), newest first."""
    queryset = visible_conversations(principal)
    if status:
        queryset = queryset.filter(status=status)
    rows = queryset.order_by("-created_at")[:limit]
    return [conversation_summary(c) for c in rows]


def message_body(message: Message) -> dict[str, Any]:
    return {
        "exchange": message.exchange,
        "role": message.role,
        "agent_id": message.agent_id,
        "turn": message.turn,
        "content": message.content,
        "raw_content": message.raw_content or message.content,
        "position": message.position,
        "position_source": message.position_source or None,
        "repair_calls": message.repair_calls,
        "confidence": message.confidence,
        "status": message.status,
        "error": message.error,
        "provider": message.provider,
        "model": message.model,
        "temperature": message.temperature,
        "personality": message.personality,
        "simulated": message.simulated,
        "latency_ms": message.latency_ms,
        "tokens": {"prompt": message.prompt_tokens, "completion": message.completion_tokens},
        "cost_usd": round(message.cost_usd, 8),
        "cost_estimated": message.cost_estimated,
        "created_at": _iso(message.created_at),
    }


def vote_body(vote: Vote) -> dict[str, Any]:
    return {
        "exchange": vote.exchange,
        "voter": vote.voter,
        "choice": vote.choice,
        "confidence": vote.confidence,
        "reason": vote.reason,
        "created_at": _iso(vote.created_at),
    }


def result_body(result: ConsensusResult) -> dict[str, Any]:
    return {
        "exchange": result.exchange,
        "method": result.method,
        "reached": result.reached,
        "winner": result.winner,
        "answer": result.answer,
        "confidence": result.confidence,
        "tie_break": result.tie_break,
        "tallies": result.tallies,
        "dissent": result.dissent,
        "details": result.details,
        "created_at": _iso(result.created_at),
    }


def conversation_detail(principal: Principal, conversation_id: uuid.UUID) -> dict[str, Any] | None:
    """A conversation with its messages, ballots and consensus results; None if unseen."""
    conversation = visible_conversations(principal).filter(pk=conversation_id).first()
    if conversation is None:
        return None
    return {
        **conversation_summary(conversation),
        "error": conversation.error,
        "metadata": conversation.metadata,
        "tokens": {"prompt": conversation.prompt_tokens, "completion": conversation.completion_tokens},
        "messages": [message_body(m) for m in conversation.messages.all()],
        "votes": [vote_body(v) for v in conversation.votes.all()],
        "consensus_results": [result_body(r) for r in conversation.results.order_by("exchange")],
    }


def _agent_body(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent_id": m["agent_id"],
        "response": m["content"],
        "raw_response": m["raw_content"] or m["content"],
        "model": m["model"],
        "temperature": m["temperature"],
        "provider": m["provider"],
        "personality": m["personality"],
        "turn": m["turn"],
        "position": m["position"] or None,
        "confidence": m["confidence"],
        "abstained": m["status"] == Message.Status.ABSTAINED,
        "position_source": m["position_source"] or None,
        "repair_calls": m["repair_calls"],
        "latency_ms": m["latency_ms"],
        "tokens": {
            "prompt": m["prompt_tokens"],
            "completion": m["completion_tokens"],
            "total": m["prompt_tokens"] + m["completion_tokens"],
        },
        "simulated": m["simulated"],
        "cost_usd": round(m["cost_usd"], 8),
        "cost_estimated": m["cost_estimated"],
    }


def _consensus_body(result: dict[str, Any] | None, agreement: Any) -> dict[str, Any] | None:
    if not result:
        return None
    details = result["details"]
    return {
        "reached": result["reached"],
        "method": result["method"],
        "winner": result["winner"] or None,
        "position": details.get("position", ""),
        "confidence": result["confidence"],
        "confidence_source": (details.get("calibration") or {}).get("confidence_source"),
        "agreement": agreement,
        "share": details.get("share"),
        "margin": details.get("margin"),
        "tallies": result["tallies"],
        "tie_break": result["tie_break"] or None,
        "dissent": result["dissent"],
    }


def _votes_body(votes: list[dict[str, Any]], result: dict[str, Any] | None) -> list[dict[str, Any]]:
    positions = (result["details"].get("options") or {}) if result else {}
    return [
        {
            "voter": v["voter"],
            "choice": v["choice"] or None,
            "position": positions.get(v["choice"], None) if isinstance(positions, dict) else None,
            "confidence": v["confidence"],
            "reason": v["reason"],
        }
        for v in votes
    ]


def _chat_metadata(conversation: Conversation, messages: list[dict[str, Any]]) -> dict[str, Any]:
    meta = conversation.metadata
    return {
        "status": conversation.status,
        "duration": conversation.duration,
        "turns_completed": conversation.turns_completed,
        "turns_requested": conversation.turns_requested,
        "num_agents": conversation.num_agents,
        "early_stop": bool(meta.get("early_stop")),
        "strategy": meta.get("strategy", "majority"),
        "simulated": any(m["simulated"] for m in messages),
        "error": conversation.error or None,
        "no_consensus_reason": meta.get("no_consensus_reason"),
        "extra_calls": meta.get("extra_calls") or {"repair": 0, "synthesis": 0},
        "extra_tokens": meta.get("extra_tokens") or {},
        "stopped": meta.get("stopped"),
        "budget": meta.get("budget"),
    }


def chat_body(
    conversation: Conversation,
    exchange: int,
    messages: list[dict[str, Any]],
    result: dict[str, Any] | None,
    votes: list[dict[str, Any]],
) -> dict[str, Any]:
    """The /chat response body from the exchange's rows (`EventStore.exchange_rows`) and its
    conversation."""
    final: dict[str, dict[str, Any]] = {}
    for message in messages:
        if message["status"] != Message.Status.FAILED:
            final[message["agent_id"]] = message  # the latest turn wins
    meta = conversation.metadata
    used = meta.get("synthesis_used") or {}
    synthesis = {
        **{k: v for k, v in used.items() if k != "calls"},
        # The mode that wrote consensus_result (None when there is none), and the one asked for.
        "mode": used.get("mode", "representative") if conversation.consensus_result else None,
        "requested": meta.get("synthesis", "representative"),
    }
    agreement = result["details"].get("agreement", result["confidence"]) if result else None
    return {
        "conversation_id": str(conversation.pk),
        "exchange": exchange,
        "agent_responses": [_agent_body(m) for _, m in sorted(final.items())],
        "consensus_result": conversation.consensus_result or None,
        "confidence": conversation.confidence,
        "synthesis": synthesis,
        "agreement": agreement,
        "consensus": _consensus_body(result, agreement),
        "votes": _votes_body(votes, result),
        "failed_agents": [
            {"agent_id": m["agent_id"], "turn": m["turn"], "error": m["error"], "model": m["model"]}
            for m in messages
            if m["status"] == Message.Status.FAILED
        ],
        "transcript": [_agent_body(m) for m in messages if m["status"] != Message.Status.FAILED],
        "usage": meta.get("tokens") or {"prompt": 0, "completion": 0, "total": 0},
        "cost": exchange_cost(conversation, messages),
        "metadata": _chat_metadata(conversation, messages),
    }


def exchange_cost(conversation: Conversation, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Estimated cost of an exchange: in total (every call, ballots included) and per turn."""
    total = conversation.metadata.get("cost") or {}
    turns: dict[int, dict[str, Any]] = {}
    for m in messages:
        empty = {"turn": m["turn"], "tokens": 0, "cost_usd": 0.0, "cost_estimated": True}
        turn = turns.setdefault(m["turn"], empty)
        turn["tokens"] += m["prompt_tokens"] + m["completion_tokens"]
        turn["cost_usd"] += m["cost_usd"]
        if m["status"] != Message.Status.FAILED:
            turn["cost_estimated"] = turn["cost_estimated"] and m["cost_estimated"]
    for turn in turns.values():
        turn["cost_usd"] = round(turn["cost_usd"], 8)
    return {
        "total_usd": total.get("cost_usd", 0.0),
        "estimated": bool(total.get("cost_estimated", False)),
        "turns": [turns[n] for n in sorted(turns)],
        "stop_estimate": conversation.metadata.get("stop_estimate"),
    }


async def achat_result(conversation: Conversation, exchange: int) -> dict[str, Any]:
    """The /chat response body: the brief's fields plus confidence, votes and usage."""
    rows = await event_store().exchange_rows(conversation.pk, exchange)
    return chat_body(conversation, exchange, *rows)
