"""The immutable values the consensus library works on: proposals, options, ballots, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Proposal:
    """One agent's answer in a turn: the full text, its short final position and its confidence."""

    agent_id: str
    text: str
    position: str
    confidence: float | None


@dataclass(frozen=True)
class Option:
    """One anonymised proposal on the ballot: a label ("A"), a representative position, its supporters."""

    label: str
    position: str
    key: str
    supporters: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "label": self.label,
            "position": self.position,
            "key": self.key,
            "supporters": list(self.supporters),
        }


@dataclass(frozen=True)
class Ballot:
    """One agent's vote: an option label, or None for an abstention."""

    voter: str
    choice: str | None
    confidence: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "voter": self.voter,
            "choice": self.choice,
            "confidence": self.confidence,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Agreement:
    """How far the panel agrees after a discussion turn (leader is a normalised answer key)."""

    leader: str | None
    leader_position: str
    share: float
    confidence: float
    groups: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "leader": self.leader,
            "leader_position": self.leader_position,
            "share": self.share,
            "confidence": self.confidence,
            "groups": dict(self.groups),
        }


@dataclass(frozen=True)
class Decision:
    """The outcome of the final vote: winner, confidence, tallies, tie-break, dissent and quorum."""

    method: str
    reached: bool
    winner: str | None
    winner_key: str | None
    winner_position: str
    confidence: float
    tallies: dict[str, float]
    ballots: tuple[Ballot, ...]
    tie_break: str | None
    dissent: tuple[Ballot, ...]
    electorate: int
    abstentions: int
    quorum: float
    options: tuple[Option, ...] = field(default=())
    share: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (ballots and dissent as lists of dicts)."""
        return {
            "method": self.method,
            "reached": self.reached,
            "winner": self.winner,
            "winner_key": self.winner_key,
            "winner_position": self.winner_position,
            "confidence": self.confidence,
            "share": self.share,
            "tallies": dict(self.tallies),
            "ballots": [b.to_dict() for b in self.ballots],
            "tie_break": self.tie_break,
            "dissent": [b.to_dict() for b in self.dissent],
            "electorate": self.electorate,
            "abstentions": self.abstentions,
            "quorum": self.quorum,
            "options": [o.to_dict() for o in self.options],
        }
