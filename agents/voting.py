"""The vote round: the agents vote over the anonymised final proposals, a strategy decides.

A unanimous panel votes without an extra call (each agent's ballot is its own proposal).
Otherwise each agent is asked for a ballot, as structured output where the provider takes
it (reason, vote, confidence), else in the text format (VOTE lines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from agents.calls import AgentCaller, Emit
from agents.profiles import AgentProfile
from agents.prompts import Prompts, ballot_output
from agents.providers.base import ProviderError
from agents.records import AgentResult, proposals_of
from consensus import (
    STRATEGIES,
    Ballot,
    Decision,
    Option,
    Proposal,
    build_options,
    parse_ballot,
    parse_structured_ballot,
)


async def vote_round(
    caller: AgentCaller,
    prompts: Prompts,
    panel: Sequence[AgentProfile],
    final: Mapping[str, AgentResult],
    *,
    turn: int,
    strategy: str,
    previous_leader: str | None,
    weights: Mapping[str, float],
) -> tuple[Decision, str, dict[str, str]]:
    """(decision, the winner's representative answer, vote label -> position) of the vote round."""
    proposals = proposals_of(final)
    options = build_options(proposals)
    by_agent = {p.agent_id: p for p in proposals}
    representative = {option.label: representative_answer(option, by_agent, final) for option in options}
    if len(options) == 1:
        ballots = sole_proposal_ballots(options[0], proposals, panel)
    else:
        prompt = prompts.ballot(options, representative)
        ballots = await _ask_ballots(caller, panel, options, by_agent, prompt, turn)
    position_of = {o.label: o.position for o in options}
    await _emit_votes(caller.emit, ballots, position_of)
    decision = STRATEGIES[strategy](
        ballots,
        options,
        electorate=len(panel),
        previous_leader=previous_leader,
        weights=weights,
    )
    answer = representative.get(decision.winner or "", "")
    return decision, answer, position_of


def sole_proposal_ballots(
    option: Option, proposals: Sequence[Proposal], panel: Sequence[AgentProfile]
) -> list[Ballot]:
    """A unanimous panel's ballots: each its own proposal; agents without one abstain."""
    ballots = [
        Ballot(
            voter=p.agent_id,
            choice=option.label,
            confidence=p.confidence if p.confidence is not None else 0.5,
            reason="sole proposal",
        )
        for p in proposals
    ]
    voters = {p.agent_id for p in proposals}
    ballots += [
        Ballot(voter=a.agent_id, choice=None, confidence=0.0, reason="no final proposal")
        for a in panel
        if a.agent_id not in voters
    ]
    return ballots


async def _ask_ballots(
    caller: AgentCaller,
    panel: Sequence[AgentProfile],
    options: Sequence[Option],
    by_agent: Mapping[str, Proposal],
    prompt: str,
    turn: int,
) -> list[Ballot]:
    """Every agent's ballot, asked for in parallel; a failed call is an abstention."""
    labels = [option.label for option in options]
    output = ballot_output(labels)
    option_meta = [{"label": o.label, "position": o.position} for o in options]
    own_label = {aid: o.label for o in options for aid in o.supporters}

    async def one(profile: AgentProfile) -> Ballot:
        own = by_agent.get(profile.agent_id)
        metadata = {
            "kind": "ballot",
            "options": option_meta,
            "own_position": own.position if own else "",
            "own_label": own_label.get(profile.agent_id, ""),
        }
        try:
            generation = await caller.call(profile, prompt, turn, metadata, stream=False, output=output)
        except ProviderError as exc:
            return Ballot(voter=profile.agent_id, choice=None, confidence=0.0, reason=f"failed: {exc.kind}")
        caller.record(profile.agent_id, turn, generation)
        if generation.data is not None:
            return parse_structured_ballot(profile.agent_id, generation.data, labels)
        return parse_ballot(profile.agent_id, generation.text, labels)

    return list(await asyncio.gather(*(one(p) for p in panel)))


async def _emit_votes(emit: Emit, ballots: Sequence[Ballot], position_of: Mapping[str, str]) -> None:
    for ballot in sorted(ballots, key=lambda b: b.voter):
        await emit(
            "vote",
            voter=ballot.voter,
            choice=ballot.choice,
            position=position_of.get(ballot.choice or "", ""),
            confidence=round(ballot.confidence, 4),
            reason=ballot.reason,
        )


def representative_answer(
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


def below_quorum(decision: Decision) -> str:
    """Why a vote reached no decision, in words."""
    tally = decision.tallies.get(decision.winner or "", 0.0)
    return (
        f"no proposal won more than {decision.quorum:g} of the vote: the leading one, "
        f"{decision.winner_position or 'none'}, had {tally:g} of {decision.electorate}"
    )
