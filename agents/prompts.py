"""What the agents are asked: the prompts of a run and the output format of each reply.

In turn 1 each agent sees the question (and the earlier exchanges of the conversation).
From turn 2 each agent also sees its own previous answer and the other agents' previous
answers, each labelled `[<agent_id>, <personality>]`. In the vote round the final proposals
are anonymised: grouped by normalised position and labelled A, B, C… so that no agent
votes for a name. The reply format (JSON or text lines) is appended by `Provider.complete`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from agents.profiles import AgentProfile
from agents.providers.base import GenerationRequest, OutputFormat
from agents.records import AgentResult
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
    Option,
    ballot_schema,
)
from consensus.scoring import option_labels

PEER_ANSWER_CHARS = 1200  # how much of each peer's previous answer the others see

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


class Prompts:
    """The prompts of one exchange: its question, the conversation so far, and the panel."""

    def __init__(
        self, *, question: str, history: Sequence[tuple[str, str]], panel: Sequence[AgentProfile]
    ) -> None:
        self.question = question
        self.history = list(history)
        self.personalities = {p.agent_id: p.personality for p in panel}

    def history_block(self) -> str:
        if not self.history:
            return ""
        lines = ["Earlier in this conversation:"]
        for number, (question, answer) in enumerate(self.history, start=1):
            lines.append(f"Q{number}: {question}")
            lines.append(f"Panel's answer {number}: {answer or '(no consensus)'}")
        return "\n".join(lines) + "\n\n"

    def answer(self, profile: AgentProfile, turn: int, previous: Mapping[str, AgentResult]) -> str:
        """The prompt of `profile`'s answer in `turn`, given the results of the turn before."""
        parts = [self.history_block(), f"Question: {self.question}\n"]
        if turn > 1 and previous:
            own = previous.get(profile.agent_id)
            if own is not None and own.ok:
                parts.append(f"\nYour previous answer (turn {turn - 1}):\n{shown(own)}\n")
            peers = [r for aid, r in sorted(previous.items()) if aid != profile.agent_id and r.ok]
            if peers:
                parts.append(f"\nThe other panelists answered in turn {turn - 1}:\n")
                for result in peers:
                    label = f"[{result.agent_id}, {self.personalities.get(result.agent_id, 'panelist')}]"
                    parts.append(f"{label}\n{shown(result)}\n")
            parts.append(
                "\nWeigh their arguments against yours. Keep your position if you still think it is right, "
                "or change it if they convinced you.\n"
            )
        else:
            parts.append("\nGive your answer.\n")
        return "".join(parts)

    def repair(self, answer: str) -> str:
        """The short follow-up for a reply without a readable position."""
        reply = answer[:PEER_ANSWER_CHARS]
        return f"Question: {self.question}\n\nYour reply:\n{reply}\n\n{REPAIR_INSTRUCTIONS}"

    def ballot(self, options: Sequence[Option], representative: Mapping[str, str]) -> str:
        """The vote round's prompt: the anonymised final proposals, each with its best answer."""
        lines = [self.history_block(), f"Question: {self.question}\n", "\nThe panel's final proposals:\n"]
        for option in options:
            summary = representative.get(option.label, "")[:PEER_ANSWER_CHARS]
            lines.append(f"\nProposal {option.label}: {option.position}\n{summary}\n")
        lines.append("\nVote for the proposal you judge best supported.")
        return "".join(lines)


def shown(result: AgentResult) -> str:
    """How a reply is shown to the other agents: its clean answer and the position read from it."""
    text = result.answer[:PEER_ANSWER_CHARS]
    if result.proposal is None:
        return text
    confidence = "" if result.proposal.confidence is None else f" (confidence {result.proposal.confidence:g})"
    return f"{text}\nFinal position: {result.proposal.position}{confidence}"
