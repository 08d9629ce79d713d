"""One discussion turn: every agent answers in parallel, then the turn is counted and reported.

Each reply is asked for as structured output where the provider takes it (a JSON object:
answer, position, confidence), else in the text format (FINAL POSITION / CONFIDENCE lines);
see `Provider.complete`. A reply with no readable position gets one short repair call
asking for the position and confidence; a short reply then falls back to its final
sentence; only then is it an abstention. What agents and users read is the clean answer,
without the machine lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import jiter

from agents.calls import AgentCaller, Emit
from agents.pricing import Cost
from agents.profiles import AgentProfile
from agents.prompts import ANSWER_OUTPUT, REPAIR_OUTPUT, Prompts
from agents.providers.base import Generation, ProviderError, Usage
from agents.records import (
    AgentResult,
    NoUsablePositions,
    QuorumLost,
    quorum_size,
    response_payload,
    result_cost,
    usage_dict,
)
from consensus import (
    Agreement,
    Proposal,
    clean_answer,
    interim_agreement,
    last_sentence_position,
    parse_reply,
    parse_structured_reply,
)
from telemetry.metrics import EXTRA_CALLS


async def discussion_turn(
    caller: AgentCaller,
    prompts: Prompts,
    panel: Sequence[AgentProfile],
    turn: int,
    results: dict[int, dict[str, AgentResult]],
    *,
    stream: bool,
) -> dict[str, AgentResult]:
    """Run `turn` for the agents without a stored result in it yet, report it; its results."""
    await caller.emit("turn_started", turn=turn)
    stored = results.setdefault(turn, {})
    previous = results.get(turn - 1, {})
    pending = [p for p in panel if p.agent_id not in stored]
    outcomes = await asyncio.gather(
        *(agent_turn(caller, prompts, p, turn, previous, stream=stream) for p in pending)
    )
    for result in outcomes:
        stored[result.agent_id] = result
    await caller.emit(
        "turn_completed",
        turn=turn,
        answered=sum(1 for r in stored.values() if r.answered),
        failed=sum(1 for r in stored.values() if not r.ok),
        abstained=sum(1 for r in stored.values() if r.ok and r.proposal is None),
        tokens=usage_dict(sum((r.usage for r in stored.values()), Usage())),
        **sum((result_cost(r) for r in stored.values()), Cost()).fields(),
    )
    return stored


def check_quorum(turn: int, stored: Mapping[str, AgentResult], electorate: int) -> None:
    """Raise QuorumLost or NoUsablePositions when too few agents gave a usable answer."""
    needed = quorum_size(electorate)
    answered = sum(1 for r in stored.values() if r.answered)
    if answered >= needed:
        return
    responded = sum(1 for r in stored.values() if r.ok)
    if responded >= needed:
        raise NoUsablePositions(
            f"the agents answered turn {turn}, but only {answered} of {responded} "
            "replies stated a usable position, even after a repair request; "
            f"{needed} are needed"
        )
    raise QuorumLost(f"only {responded} of {electorate} agents answered turn {turn}; {needed} are needed")


async def report_agreement(
    emit: Emit, turn: int, proposals: Sequence[Proposal], electorate: int
) -> Agreement:
    """The interim agreement after a turn, emitted as `consensus_update`."""
    agreement = interim_agreement(proposals, electorate)
    await emit(
        "consensus_update",
        turn=turn,
        consensus=agreement.leader_position,
        confidence=round(agreement.confidence, 4),
        share=round(agreement.share, 4),
        groups=agreement.groups,
    )
    return agreement


async def agent_turn(
    caller: AgentCaller,
    prompts: Prompts,
    profile: AgentProfile,
    turn: int,
    previous: Mapping[str, AgentResult],
    *,
    stream: bool,
) -> AgentResult:
    """One agent's answer in `turn` (repaired if unreadable), emitted as `agent_response`."""
    own = previous.get(profile.agent_id)
    metadata = {
        "kind": "answer",
        "peer_positions": [
            r.proposal.position
            for aid, r in sorted(previous.items())
            if aid != profile.agent_id and r.proposal is not None
        ],
        "previous_position": own.proposal.position if own is not None and own.proposal else "",
    }
    prompt = prompts.answer(profile, turn, previous)
    try:
        generation = await caller.call(profile, prompt, turn, metadata, stream, output=ANSWER_OUTPUT)
    except ProviderError as exc:
        return await _failed(caller.emit, profile, turn, exc)
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
        await repair(caller, prompts, profile, result)
    await caller.emit("agent_response", **response_payload(result, profile.personality))
    return result


async def _failed(emit: Emit, profile: AgentProfile, turn: int, exc: ProviderError) -> AgentResult:
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
    await emit(
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


async def repair(caller: AgentCaller, prompts: Prompts, profile: AgentProfile, result: AgentResult) -> None:
    """One short call asking for the position and confidence; then the final sentence; else abstain."""
    result.repair_calls = 1
    EXTRA_CALLS.labels("repair").inc()
    metadata = {"kind": "repair", "reply": result.answer}
    try:
        generation = await caller.call(
            profile, prompts.repair(result.answer), result.turn, metadata, stream=False, output=REPAIR_OUTPUT
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
