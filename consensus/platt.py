"""Labelled recalibration (Platt scaling) and the calibration figures (ECE, Brier) of a set of forecasts.

``PlattScaling``: once there are ``MIN_LABELLED`` outcomes (user feedback: was the answer
right?), a logistic map p' = sigmoid(a logit(p) + b) is fitted to them (Newton's method,
a small ridge towards the identity a = 1, b = 0).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

MIN_LABELLED = 30
"""Labelled outcomes needed before the Platt recalibration is used."""


def _clip(value: float, low: float, high: float) -> float:
    if math.isnan(value):
        return low
    return min(high, max(low, value))


def _logit(p: float) -> float:
    p = _clip(p, 1e-6, 1 - 1e-6)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)
    return z / (1 + z)


def _softplus(x: float) -> float:
    """log(1 + e^x), without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _penalised_log_likelihood(
    xs: Sequence[float], ys: Sequence[float], a: float, b: float, ridge: float
) -> float:
    """What PlattScaling.fit maximises: sum of log P(y | x) minus ridge/2 x ((a - 1)^2 + b^2)."""
    penalty = ridge / 2 * ((a - 1) ** 2 + b * b)
    return -penalty - math.fsum(
        y * _softplus(-(a * x + b)) + (1 - y) * _softplus(a * x + b) for x, y in zip(xs, ys, strict=True)
    )


@dataclass(frozen=True)
class PlattScaling:
    """p' = sigmoid(a logit(p) + b); the identity when a = 1, b = 0."""

    a: float = 1.0
    b: float = 0.0
    labelled: int = 0

    def __call__(self, p: float) -> float:
        if self.a == 1.0 and self.b == 0.0:
            return _clip(p, 0.0, 1.0)
        return _sigmoid(self.a * _logit(p) + self.b)

    @classmethod
    def fit(
        cls, outcomes: Sequence[tuple[float, bool]], *, minimum: int = MIN_LABELLED, ridge: float = 1.0
    ) -> PlattScaling:
        """Fit on (predicted probability, was right) pairs; the identity below `minimum` pairs.

        Maximises the log-likelihood minus ridge/2 x ((a - 1)^2 + b^2) by Newton's method; a
        is kept >= 0 so a higher raw confidence never maps to a lower one. A step that would
        make a negative stops at a = 0 (or, from a = 0, moves b alone), and a step that
        would lower the objective is halved, so the fit converges even when a plain Newton
        step overshoots (every raw confidence equal, or near 0 or 1).
        """
        if len(outcomes) < minimum:
            return cls(labelled=len(outcomes))
        xs = [_logit(p) for p, _ in outcomes]
        ys = [1.0 if y else 0.0 for _, y in outcomes]
        a, b = 1.0, 0.0
        value = _penalised_log_likelihood(xs, ys, a, b, ridge)
        for _ in range(100):
            ga, gb = -ridge * (a - 1), -ridge * b
            haa, hab, hbb = ridge, 0.0, ridge
            for x, y in zip(xs, ys, strict=True):
                p = _sigmoid(a * x + b)
                ga += (y - p) * x
                gb += y - p
                v = p * (1 - p)
                haa += v * x * x
                hab += v * x
                hbb += v
            det = haa * hbb - hab * hab
            if det <= 0:
                break
            da = (hbb * ga - hab * gb) / det
            db = (haa * gb - hab * ga) / det
            if a + da < 0:
                da, db = (-a, db * a / -da) if a > 0 else (0.0, gb / hbb)
            step = 1.0
            for _ in range(60):
                candidate = _penalised_log_likelihood(xs, ys, a + step * da, b + step * db, ridge)
                if candidate >= value:
                    break
                step /= 2
            else:
                break  # no step uphill is left: converged as far as rounding allows
            da, db = step * da, step * db
            a, b, value = max(0.0, a + da), b + db, candidate
            if abs(da) < 1e-9 and abs(db) < 1e-9:
                break
        return cls(a=a, b=b, labelled=len(outcomes))


def calibration_errors(outcomes: Sequence[tuple[float, bool]], bins: int = 10) -> dict[str, float]:
    """Mean confidence, accuracy, expected calibration error (equal-width bins) and Brier score."""
    if not outcomes:
        return {"confidence": math.nan, "accuracy": math.nan, "ece": math.nan, "brier": math.nan}
    n = len(outcomes)
    groups: dict[int, list[tuple[float, bool]]] = defaultdict(list)
    for p, y in outcomes:
        groups[min(bins - 1, int(p * bins))].append((p, y))
    ece = math.fsum(
        len(g) / n * abs(math.fsum(p for p, _ in g) / len(g) - sum(1 for _, y in g if y) / len(g))
        for g in groups.values()
    )
    return {
        "confidence": math.fsum(p for p, _ in outcomes) / n,
        "accuracy": sum(1 for _, y in outcomes if y) / n,
        "ece": ece,
        "brier": math.fsum((p - (1.0 if y else 0.0)) ** 2 for p, y in outcomes) / n,
    }
