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

from django.conf import settings

from agents.profiles import AgentProfile
from consensus import Ballot, Option

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
