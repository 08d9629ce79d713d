"""What a panel run produces: each agent's result, the run's outcome, and their event bodies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.pricing import Cost, call_cost
from agents.providers.base import Usage
from consensus import Decision, Proposal, clean_answer


@dataclass
class AgentResult:
    """One agent's outcome in one turn."""

    agent_id: str
    turn: int
    ok: bool
    text: str = ""  # the raw reply as the provider returned it (JSON for a structured reply)
    proposal: Proposal | None = None
    answer: str = ""  # the clean answer text (no machine lines, no JSON)
    # How the position was read: structured | text | repair | final_sentence ("" when abstained).
    position_source: str = ""
    repair_calls: int = 0
    repair_usage: Usage = field(default_factory=Usage)
    model: str = ""
    provider: str = ""
    temperature: float = 0.0
    latency_ms: float = 0.0
    usage: Usage = field(default_factory=Usage)
    simulated: bool = False
    error: str = ""
    error_kind: str = ""

    def __post_init__(self) -> None:
        if self.ok and not self.answer and self.text:
            self.answer = clean_answer(self.text)

    @property
    def answered(self) -> bool:
        """Answered with a usable position (an unparseable reply is an abstention)."""
        return self.ok and self.proposal is not None


@dataclass
class RunOutcome:
    status: str  # completed | no_consensus | failed
    turns_completed: int
    results: dict[int, dict[str, AgentResult]]
    decision: Decision | None = None
    answer: str = ""
    reason: str = ""
    retry_after: float | None = None
    early_stop: bool = False
    usage: Usage = field(default_factory=Usage)
    options: dict[str, str] = field(default_factory=dict)  # vote label -> position
    vote_round: bool = False  # whether the agents were asked to vote (more than one proposal)
    # Why there is no consensus: "no_usable_positions" (agents answered, none readable enough)
    # or "vote_below_quorum"; "" otherwise.
    cause: str = ""
    synthesis: dict[str, Any] = field(default_factory=lambda: {"mode": "representative"})
    synthesis_usage: Usage = field(default_factory=Usage)
    cost: Cost = field(default_factory=Cost)
    stopped: str | None = None  # "budget" or "quota" when either ended the discussion before `turns`
    stop_estimate: dict[str, Any] | None = None  # the estimate of the turn that was not run

    @property
    def repair_usage(self) -> Usage:
        """Tokens of the repair calls of every turn (already included in `usage`)."""
        return sum((r.repair_usage for turn in self.results.values() for r in turn.values()), Usage())


class QuorumLost(Exception):
    """Too few agents answered a turn for the panel to go on."""


class NoUsablePositions(Exception):
    """Enough agents answered a turn, but too few replies had a usable position (even after repair)."""


def quorum_size(electorate: int) -> int:
    """Answers needed for a turn to count: a strict majority of the panel."""
    return electorate // 2 + 1


def proposals_of(results: Mapping[str, AgentResult]) -> list[Proposal]:
    """The usable proposals of one turn, in agent order."""
    return [r.proposal for _, r in sorted(results.items()) if r.proposal is not None]


def extra_calls(
    results: Mapping[int, Mapping[str, AgentResult]], synthesis: Mapping[str, Any]
) -> dict[str, int]:
    """Calls beyond one per agent per turn and one ballot: repair requests and the chairman."""
    repairs = sum(r.repair_calls for turn in results.values() for r in turn.values())
    return {"repair": repairs, "synthesis": 1 if synthesis.get("calls") else 0}


def retry_hint(results: Mapping[str, AgentResult]) -> float | None:
    """Seconds after which a failed run is worth trying again, from its agents' errors."""
    kinds = {r.error_kind for r in results.values() if not r.ok}
    if "rate_limited" in kinds or "circuit_open" in kinds:
        return 30.0
    if kinds & {"server", "timeout", "connection"}:
        return 10.0
    return None


def usage_dict(usage: Usage) -> dict[str, int]:
    """Token counts as the API and the events report them."""
    return {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens, "total": usage.total_tokens}


def response_payload(result: AgentResult, personality: str = "") -> dict[str, Any]:
    """The `agent_response` event body (also used to rebuild responses from stored rows)."""
    return {
        "agent_id": result.agent_id,
        "turn": result.turn,
        "content": result.answer,
        "raw_content": result.text,
        "position": result.proposal.position if result.proposal else None,
        "confidence": result.proposal.confidence if result.proposal else None,
        "abstained": result.proposal is None,
        "model": result.model,
        "provider": result.provider,
        "temperature": result.temperature,
        "personality": personality,
        "latency_ms": result.latency_ms,
        "tokens": usage_dict(result.usage),
        "simulated": result.simulated,
        "position_source": result.position_source or None,
        "repair_calls": result.repair_calls,
        "repair_tokens": usage_dict(result.repair_usage),
        **result_cost(result).fields(),
    }


def result_cost(result: AgentResult) -> Cost:
    """The estimated cost of one call (a failed call reports no usage and costs nothing)."""
    if not result.ok:
        return Cost()
    return call_cost(result.model, result.usage, provider=result.provider, simulated=result.simulated)
