"""Calibrated confidence: the probability that the panel's answer is right, from an explicit model.

Model (one-coin Dawid-Skene with a "none of these" hypothesis and shared errors). A
question has V = 1/s + 1 plausible values, one of them right, each equally likely before
the panel answers (s is the chance that two wrong answers coincide: s = 1/W when wrong
answers spread evenly over W values; s = 1 for yes/no questions). Agents of one model m
(``"<provider>:<model>"``) are not independent witnesses: for each question the model
has one latent answer z_m, right with probability r_m (its reliability), otherwise one
of the wrong values; each of its agents repeats z_m with probability c_m (its
*correlation*, the share of errors it shares with its siblings) and otherwise draws
afresh (right with probability r_m, else a wrong value). c_m = 0 is the independent
model; c_m = 1 makes the model's agents one witness however many they are.

Bayes' rule over the hypotheses "k is right" for each distinct answer k, and "none of
them" (the rho = V - K values nobody gave):

    P(t | answers) = w_t prod_m L_m(t) / sum_u w_u prod_m L_m(u),   w_t = 1, w_none = rho,
    L_m(t) = sum_z q(z | t) prod_i [c_m [a_i = z] + (1 - c_m) q(a_i | t)],

the sum over z running over the distinct answers of m's agents plus every other value
(one term, with the remaining mass), and q(a | t) = r_m if a = t else (1 - r_m) s. An
agent no better than chance (r_m / ((1 - r_m) s) < 1) is read at chance, so it carries
no evidence and more support never lowers an answer's probability. A model listed in
``Reliabilities.uninformed`` (a provider that declares it does not know the answers,
like the offline simulator outside quiz mode) is read at chance as well.

Which answers. The agents' FIRST-turn answers: they are the only ones given before the
agents read each other. Discussion makes later answers depend on each other (herding);
counting them would make the panel overconfident. An answer nobody gave in turn 1 gets
the "none" mass shared over the rho unnamed values.

Fit without labels (``fit_reliabilities``): the maximum a posteriori r_m, c_m and s for
the first-turn answers of past panels, each panel's likelihood being the sum over the
hypotheses above (times the number of ways to name its answer groups with V values).
The priors (``PRIOR_RELIABILITY`` Beta(8, 4), mode 0.7; ``PRIOR_CORRELATION`` Beta(2,
10), mode 0.1; ``PRIOR_COINCIDENCE`` Beta(2, 4), mode 0.25) are the fit with no history
and keep a model seen in a few panels near them. Shared errors are visible without
labels only where the panel holds something to compare with: two agents of one model
agreeing more often than their reliability explains, against the rest of the panel or
across questions. A model alone on its panels with c_m = 1 is one witness, and one
witness's reliability cannot be learned without labels: labelled feedback
(consensus/platt.py) is the remedy there. Yes/no panels do not inform s.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from consensus.platt import MIN_LABELLED, PlattScaling, calibration_errors

BINARY_KEYS = frozenset({"yes", "no"})
"""Normalised answers of a yes/no question: s = 1, two plausible values."""

PRIOR_RELIABILITY = (8.0, 4.0)
"""Beta(a, b) prior of a model's reliability r (mode 0.7, worth 10 answers)."""

PRIOR_COINCIDENCE = (2.0, 4.0)
"""Beta(a, b) prior of the chance s that two wrong answers coincide (mode 0.25)."""

PRIOR_CORRELATION = (2.0, 10.0)
"""Beta(a, b) prior of the share c of answers a model's agents share (mode 0.1)."""

MIN_RELIABILITY, MAX_RELIABILITY = 0.01, 0.99
MIN_COINCIDENCE, MAX_COINCIDENCE = 0.01, 1.0
MIN_CORRELATION, MAX_CORRELATION = 0.0, 0.99

LOW_RELIABILITY, LOW_COINCIDENCE = 0.3, 0.05
"""The fit's search ranges start here (below them a panel is no better than chance)."""
START_RELIABILITY = (0.55, 0.65, 0.75, 0.85, 0.95)
START_CORRELATION = (0.0, 0.2, 0.4, 0.6, 0.8)
START_COINCIDENCE = (0.2, 0.35, 0.6, 1.0)
"""The coarse grid the fit starts from (see fit_reliabilities)."""

Answer = tuple[str, str]
"""(model, normalised answer key) of one agent in one panel."""

__all__ = [
    "MIN_LABELLED",
    "Answer",
    "PlattScaling",
    "Posterior",
    "Reliabilities",
    "calibration_errors",
    "evidence_weight",
    "fit_reliabilities",
    "is_binary",
    "posterior",
    "vote_weights",
]


def _mode(prior: tuple[float, float]) -> float:
    a, b = prior
    return (a - 1) / (a + b - 2)


def _clip(value: float, low: float, high: float) -> float:
    if math.isnan(value):
        return low
    return min(high, max(low, value))


@dataclass(frozen=True)
class Reliabilities:
    """Per-model reliability r_m and correlation c_m, the coincidence s, and how much history made them."""

    by_model: Mapping[str, float] = field(default_factory=dict)
    coincidence: float = _mode(PRIOR_COINCIDENCE)
    default: float = _mode(PRIOR_RELIABILITY)
    panels: int = 0
    correlation: Mapping[str, float] = field(default_factory=dict)
    default_correlation: float = _mode(PRIOR_CORRELATION)
    uninformed: frozenset[str] = frozenset()

    def of(self, model: str) -> float:
        """The model's reliability; the prior's mode for a model never seen."""
        return _clip(self.by_model.get(model, self.default), MIN_RELIABILITY, MAX_RELIABILITY)

    def correlation_of(self, model: str) -> float:
        """The share of answers the model's agents share; the prior's mode for a model never seen."""
        value = self.correlation.get(model, self.default_correlation)
        return _clip(value, MIN_CORRELATION, MAX_CORRELATION)

    @property
    def source(self) -> str:
        """ "history" once any past panel shaped the fit, else "prior"."""
        return "history" if self.panels > 0 else "prior"

    def to_dict(self) -> dict[str, object]:
        return {
            "by_model": {m: round(r, 4) for m, r in sorted(self.by_model.items())},
            "coincidence": round(self.coincidence, 4),
            "default": round(self.default, 4),
            "panels": self.panels,
            "correlation": {m: round(c, 4) for m, c in sorted(self.correlation.items())},
            "default_correlation": round(self.default_correlation, 4),
        }


def is_binary(keys: Iterable[str]) -> bool:
    """True when every answer is yes or no (and there is at least one)."""
    seen = set(keys)
    return bool(seen) and seen <= BINARY_KEYS


def _coincidence_for(keys: Iterable[str], coincidence: float) -> float:
    return 1.0 if is_binary(keys) else _clip(coincidence, MIN_COINCIDENCE, MAX_COINCIDENCE)


def evidence_weight(reliability: float, coincidence: float) -> float:
    """w = log(r / ((1 - r) s)), at least 0: how much one independent agent's answer counts for it."""
    r = _clip(reliability, MIN_RELIABILITY, MAX_RELIABILITY)
    s = _clip(coincidence, MIN_COINCIDENCE, MAX_COINCIDENCE)
    return max(0.0, math.log(r / ((1 - r) * s)))


def _chance(coincidence: float) -> float:
    """The reliability of a guess: r / ((1 - r) s) = 1, i.e. r = s / (1 + s)."""
    return coincidence / (1 + coincidence)


def _at_least_chance(reliability: float, coincidence: float) -> float:
    """r, raised to chance when it is below."""
    return max(_clip(reliability, MIN_RELIABILITY, MAX_RELIABILITY), _chance(coincidence))


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


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def _family_log_likelihood(
    counts: Sequence[tuple[str, int]], truth: str | None, r: float, c: float, s: float
) -> float:
    """log L_m(truth) - log(((1 - r) s)^n): one model's answers (key, agents) given the truth.

    Divided by their probability under "none of them" with c = 0 (a constant for the
    panel), so that large panels neither overflow nor underflow. With R = r / ((1 - r) s)
    the ratio of a right to a wrong answer, the term of a latent answer z is
    q(z) x (c / ((1 - r) s) + (1 - c) R_z)^n_z x prod over the other keys of ((1 - c) R_k)^n_k.
    """
    wrong = (1 - r) * s
    log_kept = math.log(1 - c)
    ratio = r / wrong
    independent = sum(n for _, n in counts) * log_kept + sum(
        n * math.log(ratio) for k, n in counts if k == truth
    )
    named = 0.0
    terms = []
    for z, n in counts:
        q, own = (r, ratio) if z == truth else (wrong, 1.0)
        named += q
        terms.append(
            math.log(q) + independent + n * (math.log(c / wrong + (1 - c) * own) - log_kept - math.log(own))
        )
    terms.append(_log(max(0.0, 1.0 - named)) + independent)
    return _log_sum_exp(terms)


@dataclass(frozen=True)
class _Shape:
    """One panel's answers by model: ((model, ((key, agents), ...)), ...), and its distinct keys."""

    families: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]
    keys: tuple[str, ...]

    @classmethod
    def of(cls, answers: Sequence[Answer]) -> _Shape:
        families: dict[str, Counter[str]] = defaultdict(Counter)
        for model, key in answers:
            if key:
                families[model][key] += 1
        return cls(
            families=tuple((m, tuple(sorted(families[m].items()))) for m in sorted(families)),
            keys=tuple(sorted({k for counts in families.values() for k in counts})),
        )


def _hypotheses(shape: _Shape, reliabilities: Reliabilities) -> list[float]:
    """The log weight of "k is right" for each of the shape's keys, then of "none of them"."""
    if not shape.keys:
        return []
    s = _coincidence_for(shape.keys, reliabilities.coincidence)
    rho = max(0.0, 1.0 / s + 1.0 - len(shape.keys))
    params = [
        (
            counts,
            _chance(s) if model in reliabilities.uninformed else _at_least_chance(reliabilities.of(model), s),
            reliabilities.correlation_of(model),
        )
        for model, counts in shape.families
    ]

    def log_weight(truth: str | None) -> float:
        return math.fsum(_family_log_likelihood(counts, truth, r, c, s) for counts, r, c in params)

    return [log_weight(k) for k in shape.keys] + [_log(rho) + log_weight(None)]


def posterior(answers: Sequence[Answer], reliabilities: Reliabilities) -> Posterior:
    """The model's posterior over one panel's distinct answers (order of answers is irrelevant)."""
    shape = _Shape.of(answers)
    keys, logs = shape.keys, _hypotheses(shape, reliabilities)
    if not keys:
        return Posterior(probabilities={}, none=1.0, unnamed=math.inf)
    s = _coincidence_for(keys, reliabilities.coincidence)
    total = _log_sum_exp(logs)
    weights = [math.exp(v - total) for v in logs]
    return Posterior(
        probabilities=dict(zip(keys, weights[:-1], strict=True)),
        none=weights[-1],
        unnamed=max(0.0, 1.0 / s + 1.0 - len(keys)),
    )


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
    or "yes", "no" (yes/no questions). The fit then weighs each shape by its count.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for model, key in item:
        groups[key].append(model)
    shapes = sorted(tuple(sorted(models)) for models in groups.values())
    names = ["yes", "no"] if is_binary(groups) else [str(i) for i in range(len(shapes))]
    return tuple(sorted((model, names[i]) for i, shape in enumerate(shapes) for model in shape))


def _log_beta(value: float, prior: tuple[float, float]) -> float:
    a, b = prior
    return (a - 1) * math.log(max(value, 1e-12)) + (b - 1) * math.log(max(1 - value, 1e-12))


def _log_evidence(shape: _Shape, fit: Reliabilities) -> float:
    """log P(this shape of answers): every way to name its K groups with the V values, each 1/V likely."""
    s = _coincidence_for(shape.keys, fit.coincidence)
    values = 1.0 / s + 1.0
    namings = math.prod(max(values - i, 1e-9) for i in range(len(shape.keys)))
    # The likelihoods were divided by ((1 - r) s)^n per family: put it back.
    base = math.fsum(
        sum(n for _, n in counts) * math.log((1 - _at_least_chance(fit.of(m), s)) * s)
        for m, counts in shape.families
    )
    return _log_sum_exp(_hypotheses(shape, fit)) + base + math.log(namings / values)


def _golden(objective: Callable[[float], float], low: float, high: float, steps: int) -> float:
    """The maximiser of a unimodal objective on [low, high] by golden-section search."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = objective(x1), objective(x2)
    for _ in range(steps):
        if f1 >= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = objective(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = objective(x2)
    return (a + b) / 2


def _log_posterior(patterns: Mapping[_Shape, int], fit: Reliabilities) -> float:
    """What fit_reliabilities maximises: the shapes' log evidence plus the Beta log priors."""
    value = math.fsum(times * _log_evidence(item, fit) for item, times in patterns.items())
    value += math.fsum(_log_beta(r, PRIOR_RELIABILITY) for r in fit.by_model.values())
    value += math.fsum(_log_beta(c, PRIOR_CORRELATION) for c in fit.correlation.values())
    return value + _log_beta(fit.coincidence, PRIOR_COINCIDENCE)


def _with(fit: Reliabilities, name: str, model: str, value: float) -> Reliabilities:
    """fit with one parameter changed: "r" or "c" of model, or "s"."""
    if name == "s":
        return replace(fit, coincidence=value)
    if name == "r":
        return replace(fit, by_model={**fit.by_model, model: value})
    return replace(fit, correlation={**fit.correlation, model: value})


def _start(patterns: Mapping[_Shape, int], fit: Reliabilities, open_items: bool) -> Reliabilities:
    """The best point of a coarse grid: r and c trade off along a ridge (agreement can be skill
    or shared errors) that coordinate ascent alone climbs slowly."""
    score = partial(_log_posterior, patterns)
    # Every model alike first (shared errors show as agreement within models and not across
    # them, which a model moved alone cannot explain), then each model on its own.
    for s in START_COINCIDENCE if open_items else (fit.coincidence,):
        for r in START_RELIABILITY:
            for c in START_CORRELATION:
                candidate = replace(
                    fit,
                    coincidence=s,
                    by_model=dict.fromkeys(fit.by_model, r),
                    correlation=dict.fromkeys(fit.by_model, c),
                )
                fit = max(fit, candidate, key=score)
    for model in fit.by_model:
        for r in START_RELIABILITY:
            for c in START_CORRELATION:
                candidate = _with(_with(fit, "r", model, r), "c", model, c)
                fit = max(fit, candidate, key=score)
    return fit


def _along(patterns: Mapping[_Shape, int], fit: Reliabilities, name: str, model: str, value: float) -> float:
    return _log_posterior(patterns, _with(fit, name, model, value))


def fit_reliabilities(
    panels: Iterable[Sequence[Answer]], *, sweeps: int = 3, steps: int = 24
) -> Reliabilities:
    """MAP estimate of every model's reliability and correlation, and of s, from unlabelled panels.

    From the best point of a coarse grid, coordinate ascent: each parameter in turn is set
    to the maximiser of the log posterior along it (golden-section search over its range,
    ``steps`` steps), the others held; ``sweeps`` rounds.
    """
    canonical: Counter[tuple[Answer, ...]] = Counter(
        shape for panel in panels if (shape := _canonical([(m, k) for m, k in panel if k]))
    )
    patterns = {_Shape.of(item): times for item, times in canonical.items()}
    models = sorted({m for shape in patterns for m, _ in shape.families})
    current = Reliabilities(
        by_model={m: _mode(PRIOR_RELIABILITY) for m in models},
        correlation={m: _mode(PRIOR_CORRELATION) for m in models},
        panels=sum(patterns.values()),
    )
    if not patterns:
        return current
    open_items = any(not is_binary(shape.keys) for shape in patterns)
    current = _start(patterns, current, open_items)
    coordinates = [("r", m, LOW_RELIABILITY, MAX_RELIABILITY) for m in models]
    coordinates += [("c", m, MIN_CORRELATION, MAX_CORRELATION) for m in models]
    coordinates += [("s", "", LOW_COINCIDENCE, MAX_COINCIDENCE)] if open_items else []
    for _ in range(sweeps):
        for name, model, low, high in coordinates:
            best = _golden(partial(_along, patterns, current, name, model), low, high, steps)
            current = _with(current, name, model, best)
    return current
