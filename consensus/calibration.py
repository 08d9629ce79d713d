"""Calibrated confidence: the probability that the panel's answer is right, from an explicit model.

Model (one-coin Dawid-Skene with a "none of these" hypothesis). Each agent's model m
answers a question correctly with probability r_m (its reliability), independently of
the other agents given the true answer; a wrong answer is one of the question's other
plausible values, each with the same probability s (s is the chance that two wrong
answers coincide; s = 1/W when wrong answers spread evenly over W values, s = 1 for
yes/no questions). Before the panel has seen the question, the truth is any of the
1/s + 1 plausible values. Bayes' rule then gives, for the distinct answers k_1..k_K of
one panel:

    P(k_j is right | answers) = exp(S_j) / (rho + sum_k exp(S_k)),
    P(none of them is right)  = rho / (rho + sum_k exp(S_k)),

where S_j = sum of w_m over the agents that answered k_j, w_m = log(r_m / ((1 - r_m) s))
is an agent's evidence weight (its log-likelihood ratio), and rho = 1/s + 1 - K >= 0 is
the number of plausible values nobody gave. An abstaining agent adds nothing. An agent
no better than a coin that lands on a wrong value (w_m < 0) is given weight 0, so more
support never lowers an answer's probability.

Which answers. The agents' FIRST-turn answers: they are the only ones given before the
agents read each other, so they are the ones for which independence is defensible.
Discussion makes later answers depend on each other (herding); counting them as
independent evidence would make the panel overconfident. The panel's final answer is
still decided by the final vote; the model asks how likely that answer is right given
what the agents said independently. An answer nobody gave in turn 1 gets the "none"
mass shared over the rho unnamed values.

Yes/no questions (every answer normalises to "yes" or "no") use s = 1 and two values.

Reliabilities without labels (``fit_reliabilities``): expectation-maximisation over
past panels' first-turn answers. E step: each panel's posterior above; M step: r_m is
the expected share of model m's answers that were right, s the expected share of
coinciding pairs among wrong answers; both are MAP estimates under Beta priors
(``PRIOR_RELIABILITY`` = Beta(8, 4), mode 0.7; ``PRIOR_COINCIDENCE`` = Beta(2, 4), mode
0.25), so with no history every model has r = 0.7 and s = 0.25, and a model seen in a
few panels moves only part of the way towards its data. EM on unlabelled data is
identifiable only while the panels are right more often than not (r > 1/2 on average);
the prior keeps it on that side.

Recalibration with labels (``PlattScaling``): once there are ``MIN_LABELLED`` outcomes
(user feedback: was the answer right?), a logistic map p' = sigmoid(a logit(p) + b) is
fitted to them (Newton's method, a small ridge towards the identity a = 1, b = 0).

Assumptions and their failure. Independence given the truth is the load-bearing one.
When agents share errors (same training data, same misconception), their agreement on a
wrong answer is counted as independent evidence: the confidence is then too high on
exactly those answers, and the unlabelled fit cannot see it (a shared error looks like
agreement). Labelled feedback (Platt) is the remedy; the quality benchmark reports the
size of the effect (bench/quality.py, docs/quality.md).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

BINARY_KEYS = frozenset({"yes", "no"})
"""Normalised answers of a yes/no question: s = 1, two plausible values."""

PRIOR_RELIABILITY = (8.0, 4.0)
"""Beta(a, b) prior of a model's reliability r (mode 0.7, worth 10 answers)."""

PRIOR_COINCIDENCE = (2.0, 4.0)
"""Beta(a, b) prior of the chance s that two wrong answers coincide (mode 0.25)."""

MIN_RELIABILITY, MAX_RELIABILITY = 0.01, 0.99
MIN_COINCIDENCE, MAX_COINCIDENCE = 0.01, 1.0
MIN_LABELLED = 30
"""Labelled outcomes needed before the Platt recalibration is used."""

Answer = tuple[str, str]
"""(model, normalised answer key) of one agent in one panel."""


def _mode(prior: tuple[float, float]) -> float:
    a, b = prior
    return (a - 1) / (a + b - 2)


def _clip(value: float, low: float, high: float) -> float:
    if math.isnan(value):
        return low
    return min(high, max(low, value))


@dataclass(frozen=True)
class Reliabilities:
    """Per-model reliability r_m, the coincidence s of wrong answers, and how much history made them."""

    by_model: Mapping[str, float] = field(default_factory=dict)
    coincidence: float = _mode(PRIOR_COINCIDENCE)
    default: float = _mode(PRIOR_RELIABILITY)
    panels: int = 0

    def of(self, model: str) -> float:
        """The model's reliability; the prior's mode for a model never seen."""
        return _clip(self.by_model.get(model, self.default), MIN_RELIABILITY, MAX_RELIABILITY)

    def to_dict(self) -> dict[str, object]:
        return {
            "by_model": {m: round(r, 4) for m, r in sorted(self.by_model.items())},
            "coincidence": round(self.coincidence, 4),
            "default": round(self.default, 4),
            "panels": self.panels,
        }


def is_binary(keys: Iterable[str]) -> bool:
    """True when every answer is yes or no (and there is at least one)."""
    seen = set(keys)
    return bool(seen) and seen <= BINARY_KEYS


def _coincidence_for(keys: Iterable[str], coincidence: float) -> float:
    return 1.0 if is_binary(keys) else _clip(coincidence, MIN_COINCIDENCE, MAX_COINCIDENCE)


def evidence_weight(reliability: float, coincidence: float) -> float:
    """w = log(r / ((1 - r) s)), at least 0: how much one agent's answer counts for it."""
    r = _clip(reliability, MIN_RELIABILITY, MAX_RELIABILITY)
    s = _clip(coincidence, MIN_COINCIDENCE, MAX_COINCIDENCE)
    return max(0.0, math.log(r / ((1 - r) * s)))


@dataclass(frozen=True)
class Posterior:
    """P(answer is right) for each distinct answer, and P(none of them is right)."""

    probabilities: dict[str, float]
    none: float
    unnamed: float  # rho: plausible values nobody gave

    def of(self, key: str | None) -> float:
        """P(key is right); an answer nobody gave shares the "none" mass with the other unnamed values."""
        if key is not None and key in self.probabilities:
            return self.probabilities[key]
        return self.none / max(1.0, self.unnamed)


def posterior(answers: Sequence[Answer], reliabilities: Reliabilities) -> Posterior:
    """The model's posterior over one panel's distinct answers (order of answers is irrelevant)."""
    keys = sorted({key for _, key in answers if key})
    if not keys:
        return Posterior(probabilities={}, none=1.0, unnamed=math.inf)
    s = _coincidence_for(keys, reliabilities.coincidence)
    rho = max(0.0, 1.0 / s + 1.0 - len(keys))
    scores: dict[str, float] = defaultdict(float)
    for model, key in answers:
        if key:
            scores[key] += evidence_weight(reliabilities.of(model), s)
    top = max(scores[k] for k in keys)
    # Shift by the best score so exp() cannot overflow; rho is scaled the same way.
    exps = {k: math.exp(scores[k] - top) for k in keys}
    none = rho * math.exp(-top)
    total = math.fsum(exps.values()) + none
    return Posterior(probabilities={k: exps[k] / total for k in keys}, none=none / total, unnamed=rho)


def vote_weights(
    models: Mapping[str, str], reliabilities: Reliabilities, *, binary: bool = False
) -> dict[str, float]:
    """Each voter's evidence weight w_m (voter -> weight); binary: a yes/no question (s = 1)."""
    s = 1.0 if binary else reliabilities.coincidence
    return {voter: evidence_weight(reliabilities.of(model), s) for voter, model in models.items()}


def _canonical(item: Sequence[Answer]) -> tuple[Answer, ...]:
    """The panel with its answers renamed by shape, so panels that differ only in the values coincide.

    The model treats every value alike (yes/no alike too), so only which models agreed
    matters: groups of agreeing models are sorted and renamed "0", "1"... (open questions)
    or "yes", "no" (yes/no questions). The EM fit then weighs each shape by its count.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for model, key in item:
        groups[key].append(model)
    shapes = sorted(tuple(sorted(models)) for models in groups.values())
    names = ["yes", "no"] if is_binary(groups) else [str(i) for i in range(len(shapes))]
    return tuple(sorted((model, names[i]) for i, shape in enumerate(shapes) for model in shape))


def fit_reliabilities(
    panels: Iterable[Sequence[Answer]],
    *,
    iterations: int = 50,
    tolerance: float = 1e-6,
) -> Reliabilities:
    """EM estimate of every model's reliability (and of s) from unlabelled panels' answers."""
    patterns: Counter[tuple[Answer, ...]] = Counter(
        canonical for panel in panels if (canonical := _canonical([(m, k) for m, k in panel if k]))
    )
    total = sum(patterns.values())
    models = sorted({m for item in patterns for m, _ in item})
    current = Reliabilities(by_model={m: _mode(PRIOR_RELIABILITY) for m in models}, panels=total)
    if not patterns:
        return current
    ra, rb = PRIOR_RELIABILITY
    sa, sb = PRIOR_COINCIDENCE
    for _ in range(iterations):
        right: dict[str, float] = defaultdict(float)
        seen: Counter[str] = Counter()
        pairs_same = pairs_all = 0.0
        for item, times in patterns.items():
            post = posterior(item, current)
            counts = Counter(k for _, k in item)
            for model, key in item:
                right[model] += times * post.probabilities[key]
                seen[model] += times
            if is_binary(counts):
                continue
            hypotheses = [(k, p) for k, p in post.probabilities.items()] + [("", post.none)]
            for truth, weight in hypotheses:
                wrong = {k: n for k, n in counts.items() if k != truth}
                n_wrong = sum(wrong.values())
                pairs_same += times * weight * sum(n * (n - 1) / 2 for n in wrong.values())
                pairs_all += times * weight * n_wrong * (n_wrong - 1) / 2
        by_model = {m: (ra - 1 + right[m]) / (ra + rb - 2 + seen[m]) for m in models}
        coincidence = (sa - 1 + pairs_same) / (sa + sb - 2 + pairs_all)
        change = max(
            [abs(by_model[m] - current.by_model[m]) for m in models]
            + [abs(coincidence - current.coincidence)]
        )
        current = Reliabilities(by_model=by_model, coincidence=coincidence, panels=total)
        if change < tolerance:
            break
    return current


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
