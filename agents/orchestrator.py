"""The panel run: agents discuss over turns in parallel, then vote.

The orchestrator knows providers (through `call_with_resilience`) and the `consensus`
library; it knows nothing of the database. Everything it does is reported through one
`emit(type, data)` coroutine, in order, so the caller can store it and stream it.

Prompts. In turn 1 each agent sees the question (and the earlier exchanges of the
conversation). From turn 2 each agent also sees its own previous answer and the other
agents' previous answers, each labelled `[<agent_id>, <personality>]`. In the vote
round the final proposals are anonymised: grouped by normalised position and
labelled A, B, C… so that no agent votes for a name.

Replies. Each reply is asked for as structured output where the provider takes it (a JSON
object: answer, position, confidence; ballots: reason, vote, confidence), else in the
text format (FINAL POSITION / CONFIDENCE lines); see `Provider.complete`. A reply with no
readable position gets one short repair call asking for the position and confidence;
a short reply then falls back to its final sentence; only then is it an abstention.
What agents and users read is the clean answer, without the machine lines.

The final answer is the winning option's best supporter (`representative`) or a
chairman's synthesis (`chairman`, one extra streamed call); see `agents.synthesis`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jiter

from agents.budget import Budget, next_turn_estimate, vote_estimate
from agents.pricing import Cost, call_cost
from agents.profiles import AgentProfile
from agents.providers.base import Generation, GenerationRequest, OutputFormat, ProviderError, Usage
from agents.providers.registry import get_provider
from agents.resilience import call_with_resilience
from agents.synthesis import (
    SYNTHESIS_MODES,
    Argument,
    chairman_profile,
    chairman_prompt,
    reasons_by_voter,
)
from consensus import (
    ANSWER_SCHEMA,
    BALLOT_INSTRUCTIONS,
    BALLOT_JSON_INSTRUCTIONS,
    REPAIR_INSTRUCTIONS,
    REPAIR_JSON_INSTRUCTIONS,
    REPAIR_SCHEMA,
    REPAIR_TEXT_INSTRUCTIONS,
    REPLY_INSTRUCTIONS,
    REPLY_JSON_INSTRUCTIONS,
    STRATEGIES,
    Ballot,
    Decision,
    Option,
    Proposal,
    ballot_schema,
    build_options,
    clean_answer,
    interim_agreement,
    is_unanimous,
    last_sentence_position,
    parse_ballot,
    parse_reply,
    parse_structured_ballot,
    parse_structured_reply,
)
from consensus.scoring import option_labels
from telemetry.metrics import EXTRA_CALLS

Emit = Callable[..., Awaitable[Any]]

PEER_ANSWER_CHARS = 1200  # how much of each peer's previous answer the others see
DELTA_FLUSH_SECONDS = 0.2  # agent_delta events are batched: at most ~5 per second per agent
DELTA_FLUSH_CHARS = 600

ANSWER_OUTPUT = OutputFormat(
    name="panel_answer",
    schema=ANSWER_SCHEMA,
    json_instructions=REPLY_JSON_INSTRUCTIONS,
    text_instructions=REPLY_INSTRUCTIONS,
    stream_field="answer",
)
REPAIR_OUTPUT = OutputFormat(
    name="panel_position",
    schema=REPAIR_SCHEMA,
    json_instructions=REPAIR_JSON_INSTRUCTIONS,
    text_instructions=REPAIR_TEXT_INSTRUCTIONS,
)


def ballot_output(labels: Sequence[str]) -> OutputFormat:
    """The ballot's output format; as structured output the vote is one of `labels`.

    One object per label set (a handful exist), so a provider can key what it builds from a
    format's schema by its identity, as for the constant formats above.
    """
    return _ballot_output(tuple(labels))


@lru_cache(maxsize=64)
def _ballot_output(labels: tuple[str, ...]) -> OutputFormat:
    return OutputFormat(
        name="panel_ballot",
        schema=ballot_schema(labels),
        json_instructions=BALLOT_JSON_INSTRUCTIONS,
        text_instructions=BALLOT_INSTRUCTIONS,
    )


def agent_request(
    profile: AgentProfile,
    prompt: str,
    max_output_tokens: int | None,
    *,
    output: OutputFormat | None = None,
    metadata: dict[str, Any] | None = None,
) -> GenerationRequest:
    """The request of one agent call."""
    return GenerationRequest(
        model=profile.model,
        prompt=prompt,
        system_instruction=profile.system_instruction,
        temperature=profile.temperature,
        max_output_tokens=max_output_tokens,
        metadata=metadata or {},
        output=output,
    )


def panel_shapes(
    panel: Sequence[AgentProfile], max_output_tokens: int | None
) -> list[tuple[str, GenerationRequest]]:
    """One request of each shape a run of this panel sends, with its provider's name: each
    agent's answer, repair and ballot (for every possible number of options). A provider
    prepares them at warm-up (`Provider.prepare`)."""
    formats = [ANSWER_OUTPUT, REPAIR_OUTPUT]
    formats += [ballot_output(option_labels(n)) for n in range(2, len(panel) + 1)]
    return [(p.provider, agent_request(p, "", max_output_tokens, output=f)) for p in panel for f in formats]


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


def extra_calls(
    results: Mapping[int, Mapping[str, AgentResult]], synthesis: Mapping[str, Any]
) -> dict[str, int]:
    """Calls beyond one per agent per turn and one ballot: repair requests and the chairman."""
    repairs = sum(r.repair_calls for turn in results.values() for r in turn.values())
    return {"repair": repairs, "synthesis": 1 if synthesis.get("calls") else 0}


class QuorumLost(Exception):
    """Too few agents answered a turn for the panel to go on."""


class NoUsablePositions(Exception):
    """Enough agents answered a turn, but too few replies had a usable position (even after repair)."""


class DeltaBatcher:
    """Collects token chunks of one agent's turn and emits them as few `agent_delta` events."""

    def __init__(
        self, emit: Emit, agent_id: str, turn: int, *, type: str = "agent_delta", **fields: Any
    ) -> None:
        self.emit = emit
        self.agent_id = agent_id
        self.turn = turn
        self.type = type
        self.fields = fields if type != "agent_delta" else {"agent_id": agent_id, "turn": turn}
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
            await self.emit(self.type, **self.fields, delta=text)
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
        synthesis: str = "representative",
        chairman: AgentProfile | None = None,
        budget: Budget | None = None,
        vote_weights: Mapping[str, float] | None = None,
        watched: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if synthesis not in SYNTHESIS_MODES:
            raise ValueError(f"unknown synthesis {synthesis!r}")
        self.synthesis = synthesis
        self.chairman = chairman
        self.panel = list(panel)
        self.question = question
        self.turns = turns
        self.emit = emit
        self.history = list(history)
        self.strategy = strategy
        self.deadline = time.monotonic() + deadline_seconds
        self.stream = stream
        # When set, asked before each round whether anyone watches: stream only then.
        self.watched = watched
        self.max_output_tokens = max_output_tokens
        self.results: dict[int, dict[str, AgentResult]] = {t: dict(r) for t, r in (prior or {}).items()}
        self.budget = budget
        self.other_calls: list[AgentResult] = []  # calls outside the discussion turns (ballots, chairman)
        self.stopped: str | None = None
        self.stop_estimate: dict[str, Any] | None = None
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
                parts.append(f"\nYour previous answer (turn {turn - 1}):\n{_shown(own)}\n")
            peers = [r for aid, r in sorted(previous.items()) if aid != profile.agent_id and r.ok]
            if peers:
                parts.append(f"\nThe other panelists answered in turn {turn - 1}:\n")
                labels = {p.agent_id: p.personality for p in self.panel}
                for result in peers:
                    label = f"[{result.agent_id}, {labels.get(result.agent_id, 'panelist')}]"
                    parts.append(f"{label}\n{_shown(result)}\n")
            parts.append(
                "\nWeigh their arguments against yours. Keep your position if you still think it is right, "
                "or change it if they convinced you.\n"
            )
        else:
            parts.append("\nGive your answer.\n")
        # The reply format (JSON or FINAL POSITION lines) is appended by Provider.complete.
        return "".join(parts)

    def repair_prompt(self, answer: str) -> str:
        """The short follow-up for a reply without a readable position."""
        reply = answer[:PEER_ANSWER_CHARS]
        return f"Question: {self.question}\n\nYour reply:\n{reply}\n\n{REPAIR_INSTRUCTIONS}"

    def ballot_prompt(self, options: Sequence[Option], representative: Mapping[str, str]) -> str:
        lines = [self._history_block(), f"Question: {self.question}\n", "\nThe panel's final proposals:\n"]
        for option in options:
            summary = representative.get(option.label, "")[:PEER_ANSWER_CHARS]
            lines.append(f"\nProposal {option.label}: {option.position}\n{summary}\n")
        lines.append("\nVote for the proposal you judge best supported.")
        # The ballot format (JSON or VOTE lines) is appended by Provider.complete.
        return "".join(lines)

    async def _check_watchers(self) -> None:
        """Before a round: stream from the provider only if someone can watch the deltas."""
        if self.watched is not None:
            self.stream = await self.watched()

    # --- one agent call ------------------------------------------------------------------
    async def _call(
        self,
        profile: AgentProfile,
        prompt: str,
        turn: int,
        metadata: dict[str, Any],
        stream: bool,
        *,
        output: OutputFormat | None = None,
        batcher: DeltaBatcher | None = None,
    ) -> Generation:
        provider = get_provider(profile.provider)
        request = agent_request(
            profile,
            prompt,
            self.max_output_tokens,
            output=output,
            metadata={"agent_id": profile.agent_id, "turn": turn, "question": self.question, **metadata},
        )
        if not stream:
            return await call_with_resilience(
                provider, request, fallback_models=profile.fallback_models, deadline=self.deadline
            )
        batcher = batcher or DeltaBatcher(self.emit, profile.agent_id, turn)
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
                profile, self.answer_prompt(profile, turn), turn, metadata, self.stream, output=ANSWER_OUTPUT
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
        answer, proposal, source = read_reply(profile.agent_id, generation)
        result = AgentResult(
            agent_id=profile.agent_id,
            turn=turn,
            ok=True,
            text=generation.text,
            proposal=proposal,
            answer=answer,
            position_source=source if proposal is not None else "",
            model=generation.model,
            provider=generation.provider,
            temperature=profile.temperature,
            latency_ms=round(generation.latency_ms, 1),
            usage=generation.usage,
            simulated=generation.simulated,
        )
        if proposal is None:
            await self._repair(profile, result)
        await self.emit("agent_response", **response_payload(result, profile.personality))
        return result

    async def _repair(self, profile: AgentProfile, result: AgentResult) -> None:
        """One short call asking for the position and confidence; then the final sentence; else abstain."""
        result.repair_calls = 1
        EXTRA_CALLS.labels("repair").inc()
        try:
            generation = await self._call(
                profile,
                self.repair_prompt(result.answer),
                result.turn,
                {"kind": "repair", "reply": result.answer},
                stream=False,
                output=REPAIR_OUTPUT,
            )
        except ProviderError as exc:
            generation = None
            result.error = f"repair failed: {exc.kind}"
        if generation is not None:
            result.repair_usage = generation.usage
            result.usage = result.usage + generation.usage
            _, restated, _ = read_reply(profile.agent_id, generation)
            if restated is not None:
                result.proposal = Proposal(
                    agent_id=profile.agent_id,
                    text=result.answer,
                    position=restated.position,
                    confidence=restated.confidence,
                )
                result.position_source = "repair"
                return
        position = last_sentence_position(result.answer)
        if position is not None:
            result.proposal = Proposal(
                agent_id=profile.agent_id, text=result.answer, position=position, confidence=None
            )
            result.position_source = "final_sentence"

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
                if not self._budget_allows(turn):
                    break
                await self._check_watchers()
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
                    **sum((result_cost(r) for r in stored.values()), Cost()).fields(),
                )
                turns_completed = turn
                needed = quorum_size(electorate)
                if len(answered) < needed:
                    responded = sum(1 for r in stored.values() if r.ok)
                    if responded >= needed:
                        raise NoUsablePositions(
                            f"the agents answered turn {turn}, but only {len(answered)} of {responded} "
                            "replies stated a usable position, even after a repair request; "
                            f"{needed} are needed"
                        )
                    raise QuorumLost(
                        f"only {responded} of {electorate} agents answered turn {turn}; {needed} are needed"
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
        except NoUsablePositions as exc:
            return RunOutcome(
                status="no_consensus",
                turns_completed=turns_completed,
                results=self.results,
                reason=str(exc),
                cause="no_usable_positions",
                usage=self.total_usage(),
                cost=self.total_cost(),
            )
        except QuorumLost as exc:
            return RunOutcome(
                status="failed",
                turns_completed=turns_completed,
                results=self.results,
                reason=str(exc),
                retry_after=_retry_hint(self.results.get(turns_completed, {})),
                usage=self.total_usage(),
                cost=self.total_cost(),
            )

        final_turn = max(t for t, r in self.results.items() if r)
        final = self.results[final_turn]
        decision, answer, options = await self._vote(final, previous_leader)
        status = "completed" if decision.reached else "no_consensus"
        synthesis: dict[str, Any] = {"mode": "representative"}
        synthesis_usage = Usage()
        if decision.reached and self.synthesis == "chairman":
            answer, synthesis, synthesis_usage = await self._synthesise(decision, final, answer)
        return RunOutcome(
            options=options,
            vote_round=len(options) > 1,
            status=status,
            turns_completed=turns_completed,
            results=self.results,
            decision=decision,
            answer=answer,
            early_stop=early_stop,
            cause="" if decision.reached else "vote_below_quorum",
            reason="" if decision.reached else _below_quorum(decision),
            synthesis=synthesis,
            synthesis_usage=synthesis_usage,
            usage=self.total_usage(),  # the chairman's call is one of `other_calls`
            cost=self.total_cost(),
            stopped=self.stopped,
            stop_estimate=self.stop_estimate,
        )

    async def _synthesise(
        self, decision: Decision, final: Mapping[str, AgentResult], representative: str
    ) -> tuple[str, dict[str, Any], Usage]:
        """The chairman's answer (streamed as synthesis_delta events), or the representative on failure."""
        chairman = self.chairman or chairman_profile()
        winner = next(o for o in decision.options if o.label == decision.winner)
        reasons = reasons_by_voter(decision.ballots)
        by_label: dict[str, list[Argument]] = {}
        for option in decision.options:
            by_label[option.label] = [
                Argument(aid, final[aid].answer, reasons.get(aid, ""))
                for aid in option.supporters
                if aid in final and final[aid].ok
            ]
        votes = sum(1 for b in decision.ballots if b.choice == decision.winner)
        prompt = chairman_prompt(
            question=self.question,
            winner=winner,
            options=decision.options,
            supporters=by_label.get(winner.label, []),
            dissent=by_label,
            electorate=decision.electorate,
            votes_for_winner=votes,
        )
        await self._check_watchers()
        batcher = DeltaBatcher(self.emit, chairman.agent_id, self.turns + 1, type="synthesis_delta")
        metadata = {"kind": "synthesis", "position": winner.position, "options": len(decision.options)}
        EXTRA_CALLS.labels("chairman").inc()
        try:
            generation = await self._call(
                chairman, prompt, self.turns + 1, metadata, self.stream, batcher=batcher
            )
        except ProviderError as exc:
            info = {
                "mode": "representative",
                "requested": "chairman",
                "error": f"{exc.kind}: {exc}",
                "model": exc.model or chairman.model,
                "provider": exc.provider or chairman.provider,
                "calls": 1,
            }
            await self.emit("synthesis", **info, content=representative, tokens=usage_dict(Usage()))
            return representative, info, Usage()
        self._record_call(chairman.agent_id, generation)
        text = clean_answer(generation.text).strip() or representative
        info = {
            "mode": "chairman",
            "model": generation.model,
            "provider": generation.provider,
            "latency_ms": round(generation.latency_ms, 1),
            "tokens": usage_dict(generation.usage),
            "simulated": generation.simulated,
            "calls": 1,
        }
        await self.emit("synthesis", **info, content=text)
        return text, info, generation.usage

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
            output = ballot_output(labels)
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
                    generation = await self._call(
                        profile, prompt, self.turns + 1, metadata, stream=False, output=output
                    )
                except ProviderError as exc:
                    return Ballot(
                        voter=profile.agent_id, choice=None, confidence=0.0, reason=f"failed: {exc.kind}"
                    )
                self._record_call(profile.agent_id, generation)
                if generation.data is not None:
                    return parse_structured_ballot(profile.agent_id, generation.data, labels)
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

    def _record_call(self, agent_id: str, generation: Generation) -> None:
        """Count a call outside the discussion turns (a ballot, the chairman) in usage and cost."""
        self.other_calls.append(
            AgentResult(
                agent_id=agent_id,
                turn=self.turns + 1,
                ok=True,
                model=generation.model,
                provider=generation.provider,
                usage=generation.usage,
                simulated=generation.simulated,
            )
        )

    def total_usage(self) -> Usage:
        """Tokens of every call: the discussion turns and the calls outside them (ballots)."""
        turns = sum((r.usage for turn in self.results.values() for r in turn.values()), Usage())
        return turns + sum((r.usage for r in self.other_calls), Usage())

    def total_cost(self) -> Cost:
        calls = [r for turn in self.results.values() for r in turn.values() if r.ok] + self.other_calls
        return sum((result_cost(r) for r in calls), Cost())

    def _budget_allows(self, turn: int) -> bool:
        """Whether turn `turn` (and the vote after it) fits in the budget, estimated from turn - 1."""
        if self.budget is None or turn < 2 or self.results.get(turn):
            return True  # no budget, nothing to estimate from, or a resumed turn already started
        first = {aid: r.usage for aid, r in self.results.get(1, {}).items()}
        last = {aid: r.usage for aid, r in self.results.get(turn - 1, {}).items()}
        estimate = next_turn_estimate(self.panel, first, last) + vote_estimate(self.panel, first, last)
        spent_tokens, spent_usd = self.total_usage().total_tokens, self.total_cost().usd
        self.stopped = self.budget.exceeded(spent_tokens + estimate.tokens, spent_usd + estimate.usd)
        if self.stopped is None:
            return True
        self.stop_estimate = {
            "turn": turn,
            **estimate.to_dict(),
            "spent_tokens": spent_tokens,
            "spent_cost_usd": round(spent_usd, 8),
        }
        return False


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
            return results[agent_id].answer or option.position
    return option.position


def _below_quorum(decision: Decision) -> str:
    tally = decision.tallies.get(decision.winner or "", 0.0)
    return (
        f"no proposal won more than {decision.quorum:g} of the vote: the leading one, "
        f"{decision.winner_position or 'none'}, had {tally:g} of {decision.electorate}"
    )


def _shown(result: AgentResult) -> str:
    """How a reply is shown to the other agents: its clean answer and the position read from it."""
    text = result.answer[:PEER_ANSWER_CHARS]
    if result.proposal is None:
        return text
    confidence = "" if result.proposal.confidence is None else f" (confidence {result.proposal.confidence:g})"
    return f"{text}\nFinal position: {result.proposal.position}{confidence}"


def read_reply(agent_id: str, generation: Generation) -> tuple[str, Proposal | None, str]:
    """(clean answer, proposal or None, how it was read) of one reply, structured or text."""
    data = generation.data
    if data is None and generation.structured:
        data = _partial_object(generation.text)  # cut short (max tokens): keep what arrived
    if data is not None:
        answer = data.get("answer")
        text = answer.strip() if isinstance(answer, str) else ""
        return clean_answer(text), parse_structured_reply(agent_id, data), "structured"
    return clean_answer(generation.text), parse_reply(agent_id, generation.text), "text"


def _partial_object(text: str) -> dict[str, Any] | None:
    body = text.strip()
    if not body.startswith("{"):
        return None
    try:
        value = jiter.from_json(body.encode(), partial_mode="trailing-strings")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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
