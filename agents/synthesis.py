"""How the panel's final answer is written: the winner's best supporter, or a chairman's synthesis.

`representative` (the default) costs nothing: the answer is the clean text of the
winning option's most confident supporter. `chairman` makes one extra call to a
configured model (SYNTHESIS_PROVIDER / SYNTHESIS_MODEL) that writes the final answer
from the winning side's arguments and notes the dissent; the call is streamed as
`synthesis_delta` events and its tokens are counted with the conversation's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from agents.calls import AgentCaller, DeltaBatcher
from agents.profiles import AgentProfile
from agents.providers.base import ProviderError, Usage
from agents.records import AgentResult, usage_dict
from consensus import Ballot, Decision, Option, clean_answer
from telemetry.metrics import EXTRA_CALLS

SYNTHESIS_MODES = ("representative", "chairman")
CHAIRMAN_ID = "chairman"
CHAIRMAN_TEMPERATURE = 0.3
ARGUMENT_CHARS = 1200  # of each winning supporter's answer
DISSENT_CHARS = 600  # of each other option's best answer

CHAIRMAN_INSTRUCTION = (
    "You chair a panel of AI agents that discussed a question and voted. You do not vote and "
    "you do not reopen the question: you write the panel's final answer for the person who asked."
)


@dataclass(frozen=True)
class Argument:
    """One panelist's case: who, what they answered, and why they voted as they did."""

    agent_id: str
    answer: str
    reason: str = ""


def default_mode() -> str:
    """SYNTHESIS_MODE from the settings."""
    return str(settings.CONFIG.SYNTHESIS_MODE)


def chairman_profile() -> AgentProfile:
    """The chairman: SYNTHESIS_PROVIDER (default: the agents' provider) and SYNTHESIS_MODEL."""
    config = settings.CONFIG
    provider = config.SYNTHESIS_PROVIDER or config.provider_default
    model = config.SYNTHESIS_MODEL
    if not model:
        model = (config.OPENAI_MODEL or "") if provider == "openai" else config.GEMINI_MODEL
    return AgentProfile(
        agent_id=CHAIRMAN_ID,
        provider=provider,
        model=model,
        temperature=CHAIRMAN_TEMPERATURE,
        personality="chairman",
        instruction=CHAIRMAN_INSTRUCTION,
    )


def chairman_prompt(
    *,
    question: str,
    winner: Option,
    options: Sequence[Option],
    supporters: Sequence[Argument],
    dissent: Mapping[str, Sequence[Argument]],
    electorate: int,
    votes_for_winner: int,
) -> str:
    """The chairman's prompt: the question, the winning side's arguments, and the dissent."""
    lines = [
        f"Question: {question}\n",
        f"\nThe panel ({electorate} agents) chose: {winner.position} "
        f"({votes_for_winner} of {electorate} votes).\n",
        "\nArguments of the winning side:\n",
    ]
    for argument in supporters:
        lines.append(f"\n[{argument.agent_id}]\n{argument.answer[:ARGUMENT_CHARS]}\n")
        if argument.reason:
            lines.append(f"Why they voted for it: {argument.reason}\n")
    others = [o for o in options if o.label != winner.label]
    if others:
        lines.append("\nOther positions held in the panel:\n")
        for option in others:
            lines.append(f"\n- {option.position}\n")
            for argument in dissent.get(option.label, ()):
                lines.append(f"  [{argument.agent_id}] {argument.answer[:DISSENT_CHARS]}\n")
                if argument.reason:
                    lines.append(f"  Why they voted for it: {argument.reason}\n")
    else:
        lines.append("\nNo panelist held another position.\n")
    lines.append(
        f"\nWrite the final answer for the person who asked. State the answer ({winner.position}) first, "
        "support it with the winning side's strongest arguments, and, if some panelists disagreed, "
        "say in one or two sentences what they argued and why the panel set it aside. "
        "Write plain prose: no headings about the procedure, no agent names, "
        "no FINAL POSITION or CONFIDENCE lines."
    )
    return "".join(lines)


def reasons_by_voter(ballots: Sequence[Ballot]) -> dict[str, str]:
    """Each voter's ballot reason, without the parser's [why] prefix of unusable ballots."""
    return {b.voter: b.reason for b in ballots if b.choice is not None and b.reason}


def decision_prompt(question: str, decision: Decision, final: Mapping[str, AgentResult]) -> str:
    """The chairman's prompt for a reached `decision` over the final turn's results."""
    winner = next(o for o in decision.options if o.label == decision.winner)
    reasons = reasons_by_voter(decision.ballots)
    by_label: dict[str, list[Argument]] = {}
    for option in decision.options:
        by_label[option.label] = [
            Argument(aid, final[aid].answer, reasons.get(aid, ""))
            for aid in option.supporters
            if aid in final and final[aid].ok
        ]
    return chairman_prompt(
        question=question,
        winner=winner,
        options=decision.options,
        supporters=by_label.get(winner.label, []),
        dissent=by_label,
        electorate=decision.electorate,
        votes_for_winner=sum(1 for b in decision.ballots if b.choice == decision.winner),
    )


async def synthesise(
    caller: AgentCaller,
    chairman: AgentProfile,
    decision: Decision,
    final: Mapping[str, AgentResult],
    representative: str,
    *,
    turn: int,
    stream: bool,
) -> tuple[str, dict[str, Any], Usage]:
    """The chairman's answer (streamed as synthesis_delta events), or the representative on failure."""
    winner = next(o for o in decision.options if o.label == decision.winner)
    prompt = decision_prompt(caller.question, decision, final)
    batcher = DeltaBatcher(caller.emit, chairman.agent_id, turn, type="synthesis_delta")
    metadata = {"kind": "synthesis", "position": winner.position, "options": len(decision.options)}
    EXTRA_CALLS.labels("chairman").inc()
    try:
        generation = await caller.call(chairman, prompt, turn, metadata, stream, batcher=batcher)
    except ProviderError as exc:
        info: dict[str, Any] = {
            "mode": "representative",
            "requested": "chairman",
            "error": f"{exc.kind}: {exc}",
            "model": exc.model or chairman.model,
            "provider": exc.provider or chairman.provider,
            "calls": 1,
        }
        await caller.emit("synthesis", **info, content=representative, tokens=usage_dict(Usage()))
        return representative, info, Usage()
    caller.record(chairman.agent_id, turn, generation)
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
    await caller.emit("synthesis", **info, content=text)
    return text, info, generation.usage
