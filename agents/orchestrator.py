"""The panel run: agents discuss over turns in parallel, then vote.

The orchestrator knows providers (through `call_with_resilience`) and the `consensus`
library; it knows nothing of the database. Everything it does is reported through one
`emit(type, data)` coroutine, in order, so the caller can store it and stream it.

Prompts. In turn 1 each agent sees the question (and the earlier exchanges of the
conversation). From turn 2 each agent also sees its own previous answer and the other
agents' previous answers, each labelled `[<agent_id>, <personality>]`. In the vote
round the final proposals are anonymised: grouped by normalised position and
labelled A, B, C… so that no agent votes for a name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.profiles import AgentProfile
from agents.providers.base import Generation, GenerationRequest, ProviderError, Usage
from agents.providers.registry import get_provider
from agents.resilience import call_with_resilience
from consensus import (
    BALLOT_INSTRUCTIONS,
    REPLY_INSTRUCTIONS,
    STRATEGIES,
    Ballot,
    Decision,
    Option,
    Proposal,
    build_options,
    interim_agreement,
    is_unanimous,
    parse_ballot,
    parse_reply,
)

Emit = Callable[..., Awaitable[Any]]

PEER_ANSWER_CHARS = 1200  # how much of each peer's previous answer the others see
DELTA_FLUSH_SECONDS = 0.2  # agent_delta events are batched: at most ~5 per second per agent
DELTA_FLUSH_CHARS = 600


@dataclass
class AgentResult:
    """One agent's outcome in one turn."""

    agent_id: str
    turn: int
    ok: bool
    text: str = ""
    proposal: Proposal | None = None
    model: str = ""
    provider: str = ""
    temperature: float = 0.0
    latency_ms: float = 0.0
    usage: Usage = field(default_factory=Usage)
    simulated: bool = False
    error: str = ""
    error_kind: str = ""

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


class QuorumLost(Exception):
    """Too few agents answered a turn for the panel to go on."""


class DeltaBatcher:
    """Collects token chunks of one agent's turn and emits them as few `agent_delta` events."""

    def __init__(self, emit: Emit, agent_id: str, turn: int) -> None:
        self.emit = emit
        self.agent_id = agent_id
        self.turn = turn
        self.buffer: list[str] = []
        self.size = 0
        self.last_flush = time.monotonic()

    async def add(self, chunk: str) -> None:
        self.buffer.append(chunk)
        self.size += len(chunk)
        if self.size >= DELTA_FLUSH_CHARS or time.monotonic() - self.last_flush >= DELTA_FLUSH_SECONDS:
            await self.flush()

    async def flush(self) -> None:
        if self.buffer:
            text = "".join(self.buffer)
            self.buffer.clear()
            self.size = 0
            await self.emit("agent_delta", agent_id=self.agent_id, turn=self.turn, delta=text)
        self.last_flush = time.monotonic()


def quorum_size(electorate: int) -> int:
    """Answers needed for a turn to count: a strict majority of the panel."""
    return electorate // 2 + 1


class Orchestrator:
    """Runs one exchange of a conversation with a panel of agents."""

    def __init__(
        self,
        *,
        panel: Sequence[AgentProfile],
        question: str,
        turns: int,
        emit: Emit,
        history: Sequence[tuple[str, str]] = (),
        strategy: str = "majority",
        deadline_seconds: float = 300.0,
        stream: bool = True,
        max_output_tokens: int | None = None,
        prior: Mapping[int, Mapping[str, AgentResult]] | None = None,
        vote_weights: Mapping[str, float] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        self.panel = list(panel)
        self.question = question
        self.turns = turns
        self.emit = emit
        self.history = list(history)
        self.strategy = strategy
        self.deadline = time.monotonic() + deadline_seconds
        self.stream = stream
        self.max_output_tokens = max_output_tokens
        self.results: dict[int, dict[str, AgentResult]] = {t: dict(r) for t, r in (prior or {}).items()}
        self.vote_weights = dict(vote_weights or {})  # agent_id -> weight, for the "reliability" strategy

    # --- prompts -------------------------------------------------------------------------
    def _history_block(self) -> str:
        if not self.history:
            return ""
        lines = ["Earlier in this conversation:"]
        for number, (question, answer) in enumerate(self.history, start=1):
            lines.append(f"Q{number}: {question}")
            lines.append(f"Panel's answer {number}: {answer or '(no consensus)'}")
        return "\n".join(lines) + "\n\n"

    def answer_prompt(self, profile: AgentProfile, turn: int) -> str:
        parts = [self._history_block(), f"Question: {self.question}\n"]
        previous = self.results.get(turn - 1, {})
        if turn > 1 and previous:
            own = previous.get(profile.agent_id)
            if own is not None and own.ok:
                parts.append(f"\nYour previous answer (turn {turn - 1}):\n{own.text[:PEER_ANSWER_CHARS]}\n")
            peers = [r for aid, r in sorted(previous.items()) if aid != profile.agent_id and r.ok]
            if peers:
                parts.append(f"\nThe other panelists answered in turn {turn - 1}:\n")
                labels = {p.agent_id: p.personality for p in self.panel}
                for result in peers:
                    label = f"[{result.agent_id}, {labels.get(result.agent_id, 'panelist')}]"
                    parts.append(f"{label}\n{result.text[:PEER_ANSWER_CHARS]}\n")
            parts.append(
                "\nWeigh their arguments against yours. Keep your position if you still think it is right, "
                "or change it if they convinced you.\n"
            )
        else:
            parts.append("\nGive your answer.\n")
        parts.append(REPLY_INSTRUCTIONS)
        return "".join(parts)

    def ballot_prompt(self, options: Sequence[Option], representative: Mapping[str, str]) -> str:
        lines = [self._history_block(), f"Question: {self.question}\n", "\nThe panel's final proposals:\n"]
        for option in options:
            summary = representative.get(option.label, "")[:PEER_ANSWER_CHARS]
            lines.append(f"\nProposal {option.label}: {option.position}\n{summary}\n")
        lines.append("\nVote for the proposal you judge best supported. ")
        lines.append(BALLOT_INSTRUCTIONS)
        return "".join(lines)

    # --- one agent call ------------------------------------------------------------------
    async def _call(
        self, profile: AgentProfile, prompt: str, turn: int, metadata: dict[str, Any], stream: bool
    ) -> Generation:
        provider = get_provider(profile.provider)
        request = GenerationRequest(
            model=profile.model,
            prompt=prompt,
            system_instruction=profile.system_instruction,
            temperature=profile.temperature,
            max_output_tokens=self.max_output_tokens,
            metadata={"agent_id": profile.agent_id, "turn": turn, "question": self.question, **metadata},
        )
        if not stream:
            return await call_with_resilience(
                provider, request, fallback_models=profile.fallback_models, deadline=self.deadline
            )
        batcher = DeltaBatcher(self.emit, profile.agent_id, turn)
        try:
            return await call_with_resilience(
                provider,
                request,
                fallback_models=profile.fallback_models,
                deadline=self.deadline,
                on_delta=batcher.add,
            )
        finally:
            await batcher.flush()

    async def _agent_turn(self, profile: AgentProfile, turn: int) -> AgentResult:
        previous = self.results.get(turn - 1, {})
        peer_positions = [
            r.proposal.position
            for aid, r in sorted(previous.items())
            if aid != profile.agent_id and r.proposal is not None
        ]
        own = previous.get(profile.agent_id)
        metadata = {
            "kind": "answer",
            "peer_positions": peer_positions,
            "previous_position": own.proposal.position if own is not None and own.proposal else "",
        }
        try:
            generation = await self._call(
                profile, self.answer_prompt(profile, turn), turn, metadata, self.stream
            )
        except ProviderError as exc:
            result = AgentResult(
                agent_id=profile.agent_id,
                turn=turn,
                ok=False,
                model=exc.model or profile.model,
                provider=exc.provider or profile.provider,
                temperature=profile.temperature,
                error=str(exc) or exc.kind,
                error_kind=exc.kind,
            )
            await self.emit(
                "agent_error",
                agent_id=profile.agent_id,
                turn=turn,
                error=result.error,
                kind=exc.kind,
                model=result.model,
                provider=result.provider,
                retry_after=exc.retry_after,
            )
            return result
        proposal = parse_reply(profile.agent_id, generation.text)
        result = AgentResult(
            agent_id=profile.agent_id,
            turn=turn,
            ok=True,
            text=generation.text,
            proposal=proposal,
            model=generation.model,
            provider=generation.provider,
            temperature=profile.temperature,
            latency_ms=round(generation.latency_ms, 1),
            usage=generation.usage,
            simulated=generation.simulated,
        )
        await self.emit("agent_response", **response_payload(result, profile.personality))
        return result

    # --- the run -------------------------------------------------------------------------
    async def run(self) -> RunOutcome:
        electorate = len(self.panel)
        start_turn = 1
        for turn in range(1, self.turns + 1):
            stored = self.results.get(turn, {})
            if len(stored) == electorate:
                start_turn = turn + 1
            else:
                break
        early_stop = False
        previous_leader: str | None = None
        # Replay the interim agreement of stored turns so tie-breaks know the last leader.
        for turn in range(1, start_turn):
            agreement = interim_agreement(_proposals(self.results[turn]), electorate)
            previous_leader = agreement.leader
            if is_unanimous(_proposals(self.results[turn]), electorate):
                early_stop = turn < self.turns
                start_turn = self.turns + 1
                break
        turns_completed = min(start_turn - 1, self.turns)
        try:
            for turn in range(start_turn, self.turns + 1):
                await self.emit("turn_started", turn=turn)
                stored = self.results.setdefault(turn, {})
                pending = [p for p in self.panel if p.agent_id not in stored]
                outcomes = await asyncio.gather(*(self._agent_turn(p, turn) for p in pending))
                for result in outcomes:
                    stored[result.agent_id] = result
                answered = [r for r in stored.values() if r.answered]
                usage = sum((r.usage for r in stored.values()), Usage())
                await self.emit(
                    "turn_completed",
                    turn=turn,
                    answered=len(answered),
                    failed=sum(1 for r in stored.values() if not r.ok),
                    abstained=sum(1 for r in stored.values() if r.ok and r.proposal is None),
                    tokens=usage_dict(usage),
                )
                turns_completed = turn
                if len(answered) < quorum_size(electorate):
                    raise QuorumLost(
                        f"only {len(answered)} of {electorate} agents answered turn {turn}; "
                        f"{quorum_size(electorate)} are needed"
                    )
                proposals = _proposals(stored)
                agreement = interim_agreement(proposals, electorate)
                previous_leader = agreement.leader
                await self.emit(
                    "consensus_update",
                    turn=turn,
                    consensus=agreement.leader_position,
                    confidence=round(agreement.confidence, 4),
                    share=round(agreement.share, 4),
                    groups=agreement.groups,
                )
                if is_unanimous(proposals, electorate) and turn < self.turns:
                    early_stop = True
                    break
        except QuorumLost as exc:
            return RunOutcome(
                status="failed",
                turns_completed=turns_completed,
                results=self.results,
                reason=str(exc),
                retry_after=_retry_hint(self.results.get(turns_completed, {})),
                usage=self.total_usage(),
            )

        final_turn = max(t for t, r in self.results.items() if r)
        decision, answer, options = await self._vote(self.results[final_turn], previous_leader)
        status = "completed" if decision.reached else "no_consensus"
        return RunOutcome(
            options=options,
            vote_round=len(options) > 1,
            status=status,
            turns_completed=turns_completed,
            results=self.results,
            decision=decision,
            answer=answer,
            early_stop=early_stop,
            usage=self.total_usage(),
        )

    async def _vote(
        self, final: Mapping[str, AgentResult], previous_leader: str | None
    ) -> tuple[Decision, str, dict[str, str]]:
        """The vote round over the anonymised final proposals."""
        proposals = _proposals(final)
        options = build_options(proposals)
        by_agent = {p.agent_id: p for p in proposals}
        representative = {option.label: _representative(option, by_agent, final) for option in options}
        labels = [option.label for option in options]
        own_label = {aid: o.label for o in options for aid in o.supporters}
        if len(options) == 1:
            # A unanimous panel: each agent's ballot is its own proposal, no extra LLM round.
            ballots = [
                Ballot(
                    voter=p.agent_id,
                    choice=options[0].label,
                    confidence=p.confidence if p.confidence is not None else 0.5,
                    reason="sole proposal",
                )
                for p in proposals
            ]
            # Agents without a proposal (failed or abstained) abstain.
            ballots += [
                Ballot(voter=a.agent_id, choice=None, confidence=0.0, reason="no final proposal")
                for a in self.panel
                if a.agent_id not in by_agent
            ]
        else:
            prompt = self.ballot_prompt(options, representative)
            option_meta = [{"label": o.label, "position": o.position} for o in options]

            async def one(profile: AgentProfile) -> Ballot:
                own = by_agent.get(profile.agent_id)
                metadata = {
                    "kind": "ballot",
                    "options": option_meta,
                    "own_position": own.position if own else "",
                    "own_label": own_label.get(profile.agent_id, ""),
                }
                try:
                    generation = await self._call(profile, prompt, self.turns + 1, metadata, stream=False)
                except ProviderError as exc:
                    return Ballot(
                        voter=profile.agent_id, choice=None, confidence=0.0, reason=f"failed: {exc.kind}"
                    )
                return parse_ballot(profile.agent_id, generation.text, labels)

            ballots = list(await asyncio.gather(*(one(p) for p in self.panel)))
        position_of = {o.label: o.position for o in options}
        for ballot in sorted(ballots, key=lambda b: b.voter):
            await self.emit(
                "vote",
                voter=ballot.voter,
                choice=ballot.choice,
                position=position_of.get(ballot.choice or "", ""),
                confidence=round(ballot.confidence, 4),
                reason=ballot.reason,
            )
        decision = STRATEGIES[self.strategy](
            ballots,
            options,
            electorate=len(self.panel),
            previous_leader=previous_leader,
            weights=self.vote_weights,
        )
        answer = representative.get(decision.winner or "", "")
        return decision, answer, position_of

    def total_usage(self) -> Usage:
        return sum((r.usage for turn in self.results.values() for r in turn.values()), Usage())


def _proposals(results: Mapping[str, AgentResult]) -> list[Proposal]:
    return [r.proposal for _, r in sorted(results.items()) if r.proposal is not None]


def _representative(
    option: Option, by_agent: Mapping[str, Proposal], results: Mapping[str, AgentResult]
) -> str:
    """The answer that speaks for an option: its most confident supporter's, ties by agent id."""
    supporters = sorted(
        option.supporters,
        key=lambda aid: (-(by_agent[aid].confidence or 0.0) if aid in by_agent else 0.0, aid),
    )
    for agent_id in supporters:
        if agent_id in results:
            return results[agent_id].text
    return option.position


def _retry_hint(results: Mapping[str, AgentResult]) -> float | None:
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
        "content": result.text,
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
    }
