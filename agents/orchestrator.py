"""The panel run: agents discuss over turns in parallel, then vote.

The orchestrator knows providers (through `call_with_resilience`) and the `consensus`
library; it knows nothing of the database. Everything it does is reported through one
`emit(type, data)` coroutine, in order, so the caller can store it and stream it.

The run's parts each have a module: the prompts and reply formats (`agents.prompts`),
one agent call (`agents.calls`), a discussion turn (`agents.turns`), the vote round
(`agents.voting`), the chairman's synthesis (`agents.synthesis`) and what a run produces
(`agents.records`). Other apps import the run's names from here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from agents.budget import Budget, next_turn_estimate, vote_estimate
from agents.calls import AgentCaller, Emit
from agents.pricing import Cost
from agents.profiles import AgentProfile
from agents.prompts import ANSWER_OUTPUT, REPAIR_OUTPUT, Prompts, ballot_output, panel_shapes
from agents.providers.base import Usage
from agents.records import (
    AgentResult,
    NoUsablePositions,
    QuorumLost,
    RunOutcome,
    extra_calls,
    proposals_of,
    quorum_size,
    response_payload,
    result_cost,
    retry_hint,
    usage_dict,
)
from agents.synthesis import SYNTHESIS_MODES, chairman_profile, synthesise
from agents.turns import check_quorum, discussion_turn, read_reply, report_agreement
from agents.voting import below_quorum, vote_round
from consensus import STRATEGIES, interim_agreement, is_unanimous

__all__ = [
    "ANSWER_OUTPUT",
    "REPAIR_OUTPUT",
    "AgentResult",
    "Orchestrator",
    "RunOutcome",
    "ballot_output",
    "extra_calls",
    "panel_shapes",
    "quorum_size",
    "read_reply",
    "response_payload",
    "usage_dict",
]


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
        self.turns = turns
        self.emit = emit
        self.strategy = strategy
        self.stream = stream
        # When set, asked before each round whether anyone watches: stream only then.
        self.watched = watched
        self.results: dict[int, dict[str, AgentResult]] = {t: dict(r) for t, r in (prior or {}).items()}
        self.budget = budget
        self.stopped: str | None = None  # "budget" or "quota" when either ended the discussion
        self.stop_estimate: dict[str, Any] | None = None
        self.vote_weights = dict(vote_weights or {})  # agent_id -> weight, for the "reliability" strategy
        self.prompts = Prompts(question=question, history=history, panel=self.panel)
        self.caller = AgentCaller(
            emit=emit,
            question=question,
            deadline_seconds=deadline_seconds,
            max_output_tokens=max_output_tokens,
        )

    def answer_prompt(self, profile: AgentProfile, turn: int) -> str:
        """The prompt of `profile`'s answer in `turn`, from the results of the turn before."""
        return self.prompts.answer(profile, turn, self.results.get(turn - 1, {}))

    async def _check_watchers(self) -> None:
        """Before a round: stream from the provider only if someone can watch the deltas."""
        if self.watched is not None:
            self.stream = await self.watched()

    async def run(self) -> RunOutcome:
        """Discuss for up to `turns` turns (resuming after the stored ones), then vote."""
        electorate = len(self.panel)
        start_turn, previous_leader, early_stop = self._resume_point()
        turns_completed = min(start_turn - 1, self.turns)
        try:
            for turn in range(start_turn, self.turns + 1):
                if not self._budget_allows(turn):
                    break
                await self._check_watchers()
                stored = await discussion_turn(
                    self.caller, self.prompts, self.panel, turn, self.results, stream=self.stream
                )
                turns_completed = turn
                check_quorum(turn, stored, electorate)
                proposals = proposals_of(stored)
                agreement = await report_agreement(self.emit, turn, proposals, electorate)
                previous_leader = agreement.leader
                if is_unanimous(proposals, electorate) and turn < self.turns:
                    early_stop = True
                    break
        except NoUsablePositions as exc:
            return self._ended("no_consensus", turns_completed, str(exc), cause="no_usable_positions")
        except QuorumLost as exc:
            hint = retry_hint(self.results.get(turns_completed, {}))
            return self._ended("failed", turns_completed, str(exc), retry_after=hint)
        return await self._conclude(turns_completed, previous_leader, early_stop)

    def _resume_point(self) -> tuple[int, str | None, bool]:
        """(first turn to run, the last leader, early stop) after the turns stored by an earlier run.

        The interim agreement of stored turns is replayed so that tie-breaks know the last leader.
        """
        electorate = len(self.panel)
        start_turn = 1
        for turn in range(1, self.turns + 1):
            if len(self.results.get(turn, {})) != electorate:
                break
            start_turn = turn + 1
        previous_leader: str | None = None
        for turn in range(1, start_turn):
            proposals = proposals_of(self.results[turn])
            previous_leader = interim_agreement(proposals, electorate).leader
            if is_unanimous(proposals, electorate):
                return self.turns + 1, previous_leader, turn < self.turns
        return start_turn, previous_leader, False

    def _ended(
        self,
        status: str,
        turns_completed: int,
        reason: str,
        *,
        cause: str = "",
        retry_after: float | None = None,
    ) -> RunOutcome:
        """The outcome of a discussion that ended before the vote."""
        return RunOutcome(
            status=status,
            turns_completed=turns_completed,
            results=self.results,
            reason=reason,
            cause=cause,
            retry_after=retry_after,
            usage=self.total_usage(),
            cost=self.total_cost(),
        )

    async def _conclude(
        self, turns_completed: int, previous_leader: str | None, early_stop: bool
    ) -> RunOutcome:
        """The vote over the last turn's proposals, and the final answer."""
        final = self.results[max(t for t, r in self.results.items() if r)]
        decision, answer, options = await vote_round(
            self.caller,
            self.prompts,
            self.panel,
            final,
            turn=self.turns + 1,
            strategy=self.strategy,
            previous_leader=previous_leader,
            weights=self.vote_weights,
        )
        synthesis: dict[str, Any] = {"mode": "representative"}
        synthesis_usage = Usage()
        if decision.reached and self.synthesis == "chairman":
            await self._check_watchers()
            chairman = self.chairman or chairman_profile()
            answer, synthesis, synthesis_usage = await synthesise(
                self.caller, chairman, decision, final, answer, turn=self.turns + 1, stream=self.stream
            )
        return RunOutcome(
            options=options,
            vote_round=len(options) > 1,
            status="completed" if decision.reached else "no_consensus",
            turns_completed=turns_completed,
            results=self.results,
            decision=decision,
            answer=answer,
            early_stop=early_stop,
            cause="" if decision.reached else "vote_below_quorum",
            reason="" if decision.reached else below_quorum(decision),
            synthesis=synthesis,
            synthesis_usage=synthesis_usage,
            usage=self.total_usage(),  # the chairman's call is one of the caller's `other_calls`
            cost=self.total_cost(),
            stopped=self.stopped,
            stop_estimate=self.stop_estimate,
        )

    def total_usage(self) -> Usage:
        """Tokens of every call: the discussion turns and the calls outside them (ballots)."""
        turns = sum((r.usage for turn in self.results.values() for r in turn.values()), Usage())
        return turns + sum((r.usage for r in self.caller.other_calls), Usage())

    def total_cost(self) -> Cost:
        calls = [r for turn in self.results.values() for r in turn.values() if r.ok]
        return sum((result_cost(r) for r in calls + self.caller.other_calls), Cost())

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
