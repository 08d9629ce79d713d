"""Grouping proposals into ballot options and measuring agreement after each discussion turn."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from consensus.normalize import normalize_answer
from consensus.records import Agreement, Option, Proposal
from consensus.scoring import NEUTRAL_CONFIDENCE, clamp_unit, confidence_score, option_labels, top


def _weight(proposal: Proposal) -> float:
    return NEUTRAL_CONFIDENCE if proposal.confidence is None else clamp_unit(proposal.confidence)


def _groups(proposals: Sequence[Proposal]) -> dict[str, list[Proposal]]:
    """Proposals by normalised answer key, keys sorted; proposals without a key are dropped."""
    groups: dict[str, list[Proposal]] = defaultdict(list)
    for proposal in proposals:
        key = normalize_answer(proposal.position)
        if key:
            groups[key].append(proposal)
    return {key: groups[key] for key in sorted(groups)}


def answer_keys(answers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(model, position) pairs as (model, key), the grouping the vote uses; unusable positions dropped.

    The calibrated confidence reads the panel through this function, so two phrasings the
    vote counts together ("42", "**42**", "42 (final)") are one answer to it as well.
    """
    return [(model, key) for model, position in answers if (key := normalize_answer(position))]


def _representative(group: Sequence[Proposal]) -> str:
    """The group's most frequent spelling; ties go to the larger summed confidence, then alphabetically."""
    spellings: dict[str, list[float]] = defaultdict(list)
    for proposal in group:
        spellings[" ".join(proposal.position.split())].append(_weight(proposal))
    return min(
        spellings,
        key=lambda text: (-len(spellings[text]), -math.fsum(spellings[text]), text.casefold(), text),
    )


def build_options(proposals: Sequence[Proposal]) -> list[Option]:
    """The ballot: one option per normalised answer, labelled A, B... in key order (not agent order)."""
    groups = _groups(proposals)
    return [
        Option(
            label=label,
            position=_representative(group),
            key=key,
            supporters=tuple(sorted({p.agent_id for p in group})),
        )
        for label, (key, group) in zip(option_labels(len(groups)), groups.items(), strict=True)
    ]


def interim_agreement(proposals: Sequence[Proposal], electorate: int) -> Agreement:
    """The leading answer after a turn, its share of the electorate and a confidence (see scoring).

    The leader has the most supporters; ties go to the larger summed confidence, then to
    the smaller key. The electorate counts every agent of the panel (failed ones too); it
    is raised to the number of distinct agents that answered if a caller passes less.
    """
    groups = _groups(proposals)
    if not groups:
        return Agreement(leader=None, leader_position="", share=0.0, confidence=0.0, groups={})
    size = max(electorate, len({p.agent_id for p in proposals}))
    keys = list(groups)
    leaders = top(keys, lambda k: len(groups[k]))
    leaders = top(leaders, lambda k: math.fsum(_weight(p) for p in groups[k]))
    leader = min(leaders)
    share = len(groups[leader]) / size
    runner_up = max((len(groups[k]) for k in keys if k != leader), default=0) / size
    certainty = math.fsum(_weight(p) for p in groups[leader]) / len(groups[leader])
    return Agreement(
        leader=leader,
        leader_position=_representative(groups[leader]),
        share=share,
        confidence=confidence_score(share, runner_up, certainty),
        groups={key: len(group) for key, group in groups.items()},
    )


def is_unanimous(proposals: Sequence[Proposal], electorate: int) -> bool:
    """True when every agent of the electorate answered and all answers share one key (early stop)."""
    if electorate < 1:
        return False
    keys = {normalize_answer(p.position) for p in proposals}
    answered = {p.agent_id for p in proposals}
    return len(keys) == 1 and "" not in keys and len(answered) >= electorate
