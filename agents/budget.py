"""Per-request budgets (`max_cost` USD, `max_tokens`) and the estimates that enforce them.

Before a conversation starts, its first round (turn 1 and the vote) is estimated from the
prompts it will send: about 4 characters per token, and each first answer assumed to be
FIRST_ANSWER_TOKENS long (at most the configured MAX_OUTPUT_TOKENS). Before each later
turn, the turn is estimated from the turns already run: every agent resends its turn-1
prompt plus the previous turn's answers of the whole panel (each cut to what the prompt
quotes), and writes an answer as long as its previous one. The vote that follows is
reserved as well, so a conversation stopped by its budget can still vote within it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from agents.pricing import DIGITS, tokens_cost
from agents.profiles import AgentProfile
from agents.providers.base import Usage

CHARS_PER_TOKEN = 4
FIRST_ANSWER_TOKENS = 500  # assumed length of a first-turn answer, before any is known
QUOTED_ANSWER_TOKENS = 300  # a peer's answer is quoted up to 1200 characters (orchestrator)
TURN_OVERHEAD_TOKENS = 80  # labels and instructions added to prompts from turn 2
BALLOT_TOKENS = 60  # a ballot: VOTE, CONFIDENCE and a one-line REASON


@dataclass(frozen=True)
class Budget:
    """A request's cap (USD, tokens, or both), and what the key's daily quota leaves for it."""

    max_cost: float | None = None
    max_tokens: int | None = None
    quota_usd: float | None = None
    quota_tokens: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Budget | None:
        if not data:
            return None
        budget = cls(max_cost=data.get("max_cost"), max_tokens=data.get("max_tokens"))
        return budget if budget.max_cost is not None or budget.max_tokens is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"max_cost": self.max_cost, "max_tokens": self.max_tokens}

    def with_quota(self, unit: str, room: float) -> Budget:
        """This budget, also capped by what a daily quota (in `unit`) leaves."""
        if unit == "usd":
            return replace(self, quota_usd=room)
        return replace(self, quota_tokens=room)

    def exceeded(self, tokens: int, usd: float) -> str | None:
        """What spending `tokens` and `usd` in total would pass: "budget", "quota" or None."""
        if (self.max_tokens is not None and tokens > self.max_tokens) or (
            self.max_cost is not None and usd > self.max_cost
        ):
            return "budget"
        if (self.quota_tokens is not None and tokens > self.quota_tokens) or (
            self.quota_usd is not None and usd > self.quota_usd
        ):
            return "quota"
        return None

    def allows(self, tokens: int, usd: float) -> bool:
        """Whether spending `tokens` and `usd` in total stays within the budget (and quota)."""
        return self.exceeded(tokens, usd) is None


@dataclass(frozen=True)
class Estimate:
    """Tokens and USD that calls not made yet are expected to use."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.usd + other.usd,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "cost_usd": round(self.usd, DIGITS)}


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def call_estimate(profile: AgentProfile, prompt_tokens: int, completion_tokens: int) -> Estimate:
    return Estimate(
        prompt_tokens,
        completion_tokens,
        tokens_cost(profile.model, prompt_tokens, completion_tokens, provider=profile.provider),
    )


def _mean(values: Sequence[int], default: int) -> int:
    return round(sum(values) / len(values)) if values else default


def next_turn_estimate(
    panel: Sequence[AgentProfile], first: Mapping[str, Usage], last: Mapping[str, Usage]
) -> Estimate:
    """The next discussion turn, from turn 1's prompts and the previous turn's answers."""
    base = {aid: u.prompt_tokens for aid, u in first.items() if u.prompt_tokens}
    answers = {aid: u.completion_tokens for aid, u in last.items() if u.completion_tokens}
    quoted = sum(min(c, QUOTED_ANSWER_TOKENS) for c in answers.values()) + TURN_OVERHEAD_TOKENS
    default_base = _mean(list(base.values()), 0)
    default_answer = _mean(list(answers.values()), FIRST_ANSWER_TOKENS)
    total = Estimate()
    for profile in panel:
        prompt = base.get(profile.agent_id, default_base) + quoted
        total += call_estimate(profile, prompt, answers.get(profile.agent_id, default_answer))
    return total


def vote_estimate(
    panel: Sequence[AgentProfile], first: Mapping[str, Usage], last: Mapping[str, Usage]
) -> Estimate:
    """The vote after a turn: each agent reads every proposal and writes a short ballot."""
    base = {aid: u.prompt_tokens for aid, u in first.items() if u.prompt_tokens}
    quoted = sum(min(u.completion_tokens, QUOTED_ANSWER_TOKENS) for u in last.values())
    default_base = _mean(list(base.values()), 0)
    total = Estimate()
    for profile in panel:
        total += call_estimate(profile, base.get(profile.agent_id, default_base) + quoted, BALLOT_TOKENS)
    return total


def first_round_estimate(
    panel: Sequence[AgentProfile], prompt_for: Callable[[AgentProfile], str], max_output_tokens: int | None
) -> Estimate:
    """Turn 1 and the vote, before anything has run: from the prompts' lengths."""
    answer = min(FIRST_ANSWER_TOKENS, max_output_tokens or FIRST_ANSWER_TOKENS)
    usage = {
        p.agent_id: Usage(text_tokens(p.system_instruction) + text_tokens(prompt_for(p)), answer)
        for p in panel
    }
    turn = Estimate()
    for profile in panel:
        turn += call_estimate(profile, usage[profile.agent_id].prompt_tokens, answer)
    return turn + vote_estimate(panel, usage, usage)
