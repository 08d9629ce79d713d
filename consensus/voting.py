"""The final vote: majority and confidence-weighted strategies over the anonymised options."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from consensus.records import Ballot, Decision, Option
from consensus.scoring import EPSILON, clamp_unit, confidence_score, top

MIN_WEIGHT = 0.05
"""The least a valid ballot weighs in the weighted vote, so a zero-confidence ballot still counts."""


class Strategy(Protocol):
    """The signature every vote strategy shares."""

    def __call__(
        self,
        ballots: Sequence[Ballot],
        options: Sequence[Option],
        *,
        electorate: int,
        previous_leader: str | None = None,
        quorum: float = 0.5,
        weights: Mapping[str, float] | None = None,
    ) -> Decision: ...


def _check(ballots: Sequence[Ballot], electorate: int, quorum: float) -> None:
    if not 0 <= quorum < 1:
        raise ValueError(f"quorum must be in [0, 1), got {quorum}")
    if electorate < 0:
        raise ValueError(f"electorate must be >= 0, got {electorate}")
    voters = [b.voter for b in ballots]
    if len(set(voters)) != len(voters):
        raise ValueError("each voter may cast one ballot")


def _decide(
    method: str,
    weight: Callable[[Ballot], float],
    ballots: Sequence[Ballot],
    options: Sequence[Option],
    electorate: int,
    previous_leader: str | None,
    quorum: float,
) -> Decision:
    """Tally ballots with weight, pick the winner with the documented tie-break, score the result."""
    _check(ballots, electorate, quorum)
    ordered = tuple(sorted(options, key=lambda o: (len(o.label), o.label)))
    by_label = {option.label: option for option in ordered}
    recorded = tuple(sorted(ballots, key=lambda b: b.voter))
    valid = [b for b in recorded if b.choice in by_label]
    size = max(electorate, len(recorded))
    backers = {label: [b for b in valid if b.choice == label] for label in by_label}
    tallies = {label: math.fsum(weight(b) for b in backers[label]) for label in by_label}
    confidence_sums = {
        label: math.fsum(clamp_unit(b.confidence) for b in backers[label]) for label in by_label
    }
    total = math.fsum(tallies.values())

    def share(label: str) -> float:
        # The label's part of the cast weight times the turnout (majority: votes / electorate).
        return tallies[label] / total * len(valid) / size if total > 0 else 0.0

    winner: str | None = None
    tie_break: str | None = None
    candidates = top([label for label in by_label if backers[label]], lambda label: tallies[label])
    if len(candidates) > 1:
        candidates = top(candidates, lambda label: confidence_sums[label])
        tie_break = "confidence"
    if len(candidates) > 1:
        led = [label for label in candidates if by_label[label].key == previous_leader]
        candidates, tie_break = (led, "previous_leader") if len(led) == 1 else (candidates, "stable_order")
    if candidates:
        winner = min(candidates, key=lambda label: (by_label[label].key, label))

    winner_share = share(winner) if winner else 0.0
    runner_up = max((share(label) for label in by_label if label != winner), default=0.0)
    certainty = (confidence_sums[winner] / len(backers[winner])) if winner else 0.0
    return Decision(
        method=method,
        reached=winner is not None and winner_share - quorum > EPSILON,
        winner=winner,
        winner_key=by_label[winner].key if winner else None,
        winner_position=by_label[winner].position if winner else "",
        confidence=confidence_score(winner_share, runner_up, certainty) if winner else 0.0,
        tallies=tallies,
        ballots=recorded,
        tie_break=tie_break,
        dissent=tuple(b for b in recorded if winner is None or b.choice != winner),
        electorate=size,
        abstentions=size - len(valid),
        quorum=quorum,
        options=ordered,
        share=winner_share,
    )


def majority_vote(
    ballots: Sequence[Ballot],
    options: Sequence[Option],
    *,
    electorate: int,
    previous_leader: str | None = None,
    quorum: float = 0.5,
    weights: Mapping[str, float] | None = None,
) -> Decision:
    """One ballot, one vote (weights ignored); reached when the winner has more than quorum of the voters."""
    return _decide("majority", lambda _: 1.0, ballots, options, electorate, previous_leader, quorum)


def weighted_vote(
    ballots: Sequence[Ballot],
    options: Sequence[Option],
    *,
    electorate: int,
    previous_leader: str | None = None,
    quorum: float = 0.5,
    weights: Mapping[str, float] | None = None,
) -> Decision:
    """Each ballot weighs its confidence (at least MIN_WEIGHT); same tie-break and quorum rule as majority."""
    return _decide(
        "weighted",
        lambda b: max(MIN_WEIGHT, clamp_unit(b.confidence)),
        ballots,
        options,
        electorate,
        previous_leader,
        quorum,
    )


def reliability_vote(
    ballots: Sequence[Ballot],
    options: Sequence[Option],
    *,
    electorate: int,
    previous_leader: str | None = None,
    quorum: float = 0.5,
    weights: Mapping[str, float] | None = None,
) -> Decision:
    """Each ballot weighs its voter's evidence weight (consensus.calibration.vote_weights).

    weights maps a voter to log(r / ((1 - r) s)) of its model's reliability r, so the
    winner is the answer the calibration model finds most probable; a voter missing from
    weights (or no weights at all) weighs 1, so equal reliabilities give the majority
    vote. Every valid ballot weighs at least MIN_WEIGHT.
    """
    table = weights or {}
    return _decide(
        "reliability",
        lambda b: max(MIN_WEIGHT, table.get(b.voter, 1.0)),
        ballots,
        options,
        electorate,
        previous_leader,
        quorum,
    )


STRATEGIES: dict[str, Strategy] = {
    "majority": majority_vote,
    "weighted": weighted_vote,
    "reliability": reliability_vote,
}
