"""OpenAI shapes of a panel's run: model objects, the chat.completion, the chunks of a stream."""

from __future__ import annotations

import json
from typing import Any

from panels.registry import PanelConfig

OWNER = "polyagents"


def model_object(panel: PanelConfig) -> dict[str, Any]:
    return {
        "id": panel.id,
        "object": "model",
        "created": panel.created,
        "owned_by": OWNER,
        "description": panel.description,
        "agents": [
            {"agent_id": a.agent_id, "provider": a.provider, "model": a.model, "temperature": a.temperature}
            for a in panel.agents
        ],
        "turns": panel.turns,
        "strategy": panel.strategy,
    }


def answer_text(body: dict[str, Any]) -> str:
    """The completion's content: the consensus answer, or a plain statement that there is none."""
    if body["consensus_result"]:
        return str(body["consensus_result"])
    meta = body["metadata"]
    reason = meta.get("no_consensus_reason") or meta.get("error") or meta["status"]
    return f"The panel did not reach a consensus ({reason})."


def finish_reason(body: dict[str, Any]) -> str:
    """`length` when a budget or quota ended the discussion early, `stop` otherwise."""
    return "length" if body["metadata"].get("stopped") else "stop"


def usage(body: dict[str, Any]) -> dict[str, int]:
    tokens = body["usage"]
    return {
        "prompt_tokens": int(tokens.get("prompt", 0)),
        "completion_tokens": int(tokens.get("completion", 0)),
        "total_tokens": int(tokens.get("total", 0)),
    }


def polyagents(body: dict[str, Any], panel: str) -> dict[str, Any]:
    """What OpenAI's shape has no room for: the deliberation's outcome, votes and cost."""
    consensus = body["consensus"] or {}
    return {
        "conversation_id": body["conversation_id"],
        "exchange": body["exchange"],
        "panel": panel,
        "status": body["metadata"]["status"],
        "turns_completed": body["metadata"]["turns_completed"],
        "confidence": body["confidence"],
        "agreement": body["agreement"],
        "consensus": {
            "reached": consensus.get("reached", False),
            "winner": consensus.get("winner"),
            "tallies": consensus.get("tallies", {}),
            "method": consensus.get("method"),
        },
        "votes": body["votes"],
        "agents": [
            {
                "agent_id": a["agent_id"],
                "provider": a["provider"],
                "model": a["model"],
                "cost_usd": a["cost_usd"],
                "tokens": a["tokens"],
            }
            for a in body["agent_responses"]
        ],
        "cost_usd": body["cost"]["total_usd"],
        "no_consensus_reason": body["metadata"].get("no_consensus_reason"),
        "stopped": body["metadata"].get("stopped"),
    }


def completion(body: dict[str, Any], *, completion_id: str, created: int, panel: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": panel,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer_text(body), "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(body),
            }
        ],
        "usage": usage(body),
        "polyagents": polyagents(body, panel),
    }


class ChunkWriter:
    """Serialises the chunks of one streamed completion as Server-Sent Events."""

    def __init__(self, *, completion_id: str, created: int, panel: str) -> None:
        self.head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": panel,
        }
        self.speaker: tuple[str, int] | None = None

    @staticmethod
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self.event({**self.head, "system_fingerprint": None, "choices": [choice], **extra})

    def reasoning(self, agent_id: str, turn: int, text: str) -> str:
        """An agent's words, headed by its name and turn whenever the speaker changes."""
        if self.speaker != (agent_id, turn):
            self.speaker = (agent_id, turn)
            text = f"\n\n[{agent_id}, turn {turn}]\n{text}"
        return self.chunk({"reasoning_content": text}, polyagents={"agent_id": agent_id, "turn": turn})

    def note(self, text: str, **extra: Any) -> str:
        """A line of the deliberation that no agent speaks (a failure, the vote)."""
        self.speaker = None
        return self.chunk({"reasoning_content": f"\n\n{text}"}, polyagents=extra)


def vote_summary(event: dict[str, Any]) -> str:
    tallies = event.get("tallies") or {}
    counts = ", ".join(f"{option}: {count:g}" for option, count in sorted(tallies.items()))
    outcome = f"winner {event.get('winner')}" if event.get("reached") else "no consensus"
    return (
        f"[vote, {event.get('method')}] {counts or 'no ballots'}; {outcome}; "
        f"confidence {event.get('confidence')}, agreement {event.get('agreement')}"
    )
