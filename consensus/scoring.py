"""Shared arithmetic of the consensus library: the confidence formula, near-equality, labels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

NEUTRAL_CONFIDENCE = 0.5
"""The weight of a reply that gave no readable confidence."""

EPSILON = 1e-9
"""Sums closer than this are equal (float sums of the same values in another order may differ)."""


def clamp_unit(value: float) -> float:
    """value clamped to [0, 1]; NaN counts as 0."""
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, value))


def confidence_score(share: float, runner_up: float, certainty: float) -> float:
    """The decision's confidence: ((share + margin) / 2) x ((1 + certainty) / 2), in [0, 1].

    share is the winner's share of the electorate, runner_up the best other option's
    share (margin = share - runner_up) and certainty the mean confidence of the
    winner's supporters. It is 1.0 only when the whole electorate backs the winner with
    full confidence; absent, failed or abstaining agents lower the share, dissent lowers
    the margin, hesitant supporters lower the certainty factor.
    """
    share, runner_up = clamp_unit(share), clamp_unit(min(runner_up, share))
    strength = (share + (share - runner_up)) / 2
    return clamp_unit(strength * (1 + clamp_unit(certainty)) / 2)


def top(candidates: Sequence[T], score: Callable[[T], float]) -> list[T]:
    """The candidates whose score is within EPSILON of the best score."""
    if not candidates:
        return []
    best = max(score(c) for c in candidates)
    return [c for c in candidates if score(c) >= best - EPSILON]


def option_labels(count: int) -> list[str]:
    """count ballot labels: A..Z, then AA, AB... (spreadsheet columns)."""
    labels = []
    for index in range(count):
        label, number = "", index + 1
        while number:
            number, rest = divmod(number - 1, 26)
            label = chr(ord("A") + rest) + label
        labels.append(label)
    return labels
