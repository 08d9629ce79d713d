"""consensus.calibration: the probability model, the EM fit, Platt recalibration, the reliability vote."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus import (
    Ballot,
    Option,
    PlattScaling,
    Reliabilities,
    fit_reliabilities,
    posterior,
    reliability_vote,
)
from consensus.calibration import (
    MIN_LABELLED,
    PRIOR_COINCIDENCE,
    PRIOR_CORRELATION,
    PRIOR_RELIABILITY,
    _canonical,
    _log_beta,
    _log_evidence,
    _Shape,
    calibration_errors,
    evidence_weight,
    is_binary,
    vote_weights,
)

PROPERTY = settings(
    max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
THIRD = Reliabilities(by_model={"m": 0.7}, coincidence=1 / 3, default_correlation=0.0)
"""Independent agents (c = 0): the one-coin model's closed form."""
INDEPENDENT = Reliabilities(by_model={"m": 0.7}, default_correlation=0.0)


def test_a_two_to_one_split_is_exact_bayes_for_the_uniform_model() -> None:
    # r = 0.7, s = 1/3 (wrong answers spread over 3 values, so 4 plausible values): w = log 7.
    post = posterior([("m", "42"), ("m", "42"), ("m", "43")], THIRD)
    rho = 3 + 1 - 2
    assert post.probabilities["42"] == pytest.approx(49 / (rho + 49 + 7))
    assert post.probabilities["43"] == pytest.approx(7 / (rho + 49 + 7))
    assert post.none == pytest.approx(rho / (rho + 49 + 7))
    assert post.unnamed == rho


def test_a_unanimous_panel_is_more_confident_than_a_split_one() -> None:
    unanimous = posterior([("m", "42")] * 3, THIRD).of("42")
    split = posterior([("m", "42"), ("m", "42"), ("m", "43")], THIRD).of("42")
    assert unanimous == pytest.approx(343 / (3 + 343))
    assert 0.8 < split < unanimous < 1.0


def test_yes_no_questions_use_two_values() -> None:
    post = posterior([("m", "yes"), ("m", "yes"), ("m", "no")], INDEPENDENT)
    odds = 0.7 / 0.3
    assert post.probabilities["yes"] == pytest.approx(odds**2 / (odds**2 + odds))
    assert post.none == 0.0
    assert is_binary(["yes", "no"])
    assert not is_binary(["yes", "maybe"])
    assert not is_binary([])


def test_an_answer_nobody_gave_shares_the_none_mass() -> None:
    post = posterior(
        [("m", "1"), ("m", "2"), ("m", "3")], Reliabilities(by_model={"m": 0.7}, coincidence=0.1)
    )
    assert post.unnamed == pytest.approx(8.0)
    assert post.of("99") == pytest.approx(post.none / 8)
    assert post.of(None) == pytest.approx(post.none / 8)


def test_no_answers_at_all_means_nothing_is_known() -> None:
    post = posterior([("m", "")], THIRD)
    assert post.probabilities == {}
    assert post.none == 1.0
    assert post.of("42") == 0.0


def test_a_worse_than_chance_agent_carries_no_evidence() -> None:
    assert evidence_weight(0.1, 1.0) == 0.0
    assert evidence_weight(0.5, 1.0) == 0.0
    assert evidence_weight(0.7, 1.0) == pytest.approx(math.log(0.7 / 0.3))
    assert evidence_weight(float("nan"), 0.5) == 0.0
    assert evidence_weight(1.0, 0.0) == pytest.approx(math.log(0.99 / (0.01 * 0.01)))


def test_a_model_never_seen_gets_the_prior() -> None:
    fitted = Reliabilities(by_model={"a": 0.9})
    assert fitted.of("a") == 0.9
    assert fitted.of("b") == pytest.approx(0.7)
    assert Reliabilities().coincidence == pytest.approx(0.25)
    assert Reliabilities(by_model={"a": 1.5}).of("a") == 0.99
    assert Reliabilities(by_model={"a": -1}).of("a") == 0.01


def test_vote_weights_follow_the_reliabilities() -> None:
    fitted = Reliabilities(by_model={"strong": 0.85, "weak": 0.6}, coincidence=1 / 3)
    weights = vote_weights({"a0": "strong", "a1": "weak"}, fitted)
    assert weights["a0"] == pytest.approx(math.log(0.85 * 3 / 0.15))
    assert weights["a1"] == pytest.approx(math.log(0.6 * 3 / 0.4))
    binary = vote_weights({"a0": "strong"}, fitted, binary=True)
    assert binary["a0"] == pytest.approx(math.log(0.85 / 0.15))


def test_the_unnamed_value_of_a_yes_no_question_is_the_other_answer() -> None:
    odds = 0.7 / 0.3
    post = posterior([("m", "yes"), ("m", "yes")], INDEPENDENT)
    # s = 1 and two values: "no" is the one value nobody gave (rho = 1), whatever s the fit has.
    assert post.unnamed == 1.0
    assert post.probabilities["yes"] == pytest.approx(odds**2 / (1 + odds**2))
    assert post.of("no") == post.none == pytest.approx(1 / (1 + odds**2))
    both = posterior([("m", "yes"), ("m", "no")], INDEPENDENT)
    assert (both.unnamed, both.none) == (0.0, 0.0)
    assert both.of("maybe") == 0.0


def test_fewer_than_one_unnamed_value_takes_the_whole_none_mass() -> None:
    # s = 0.4: 1/s + 1 = 3.5 plausible values, 3 named, so rho = 0.5 and an unnamed answer
    # gets the "none" mass undivided (the mass is never multiplied up).
    post = posterior(
        [("m", "1"), ("m", "2"), ("m", "3")], Reliabilities(by_model={"m": 0.7}, coincidence=0.4)
    )
    assert post.unnamed == pytest.approx(0.5)
    assert 0.0 < post.none < 1.0
    assert post.of("99") == post.none


def test_a_large_confident_panel_does_not_overflow() -> None:
    # 100 agents at r = 0.99, s = 0.01 give "a" a score of 100 x log(9900) ~ 919 > log(max float).
    fitted = Reliabilities(by_model={"m": 0.99}, coincidence=0.01, default_correlation=0.0)
    post = posterior([("m", "a")] * 100 + [("m", "b")], fitted)
    assert post.of("a") == pytest.approx(1.0)
    assert 0.0 <= post.of("b") < 1e-300
    assert math.fsum(post.probabilities.values()) + post.none == pytest.approx(1.0)


def test_a_coincidence_above_one_is_read_as_one() -> None:
    assert evidence_weight(0.7, 5.0) == pytest.approx(math.log(0.7 / 0.3))
    post = posterior([("m", "1"), ("m", "2")], Reliabilities(by_model={"m": 0.7}, coincidence=5.0))
    assert post.unnamed == 0.0  # 1/s + 1 - 2 with s = 1


def test_reliabilities_serialise_rounded_to_four_places() -> None:
    assert Reliabilities().to_dict() == {
        "by_model": {},
        "coincidence": 0.25,
        "default": 0.7,
        "panels": 0,
        "correlation": {},
        "default_correlation": 0.1,
    }
    fitted = Reliabilities(
        by_model={"b": 0.123456, "a": 0.9},
        coincidence=1 / 3,
        default=0.712345,
        panels=7,
        correlation={"b": 0.55556},
    )
    data = fitted.to_dict()
    assert data == {
        "by_model": {"a": 0.9, "b": 0.1235},
        "coincidence": 0.3333,
        "default": 0.7123,
        "panels": 7,
        "correlation": {"b": 0.5556},
        "default_correlation": 0.1,
    }
    assert list(data["by_model"]) == ["a", "b"]  # type: ignore[call-overload]


# --- the fit without labels -------------------------------------------------------------------


def synthetic(
    panels: int, skills: dict[str, float], seed: int, shared: bool = False
) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    items = []
    for _ in range(panels):
        item = []
        for agent, p in skills.items():
            model = agent.rstrip("0123456789")
            wrong = "x" if shared else rng.choice(["x", "y", "z"])
            item.append((model, "t" if rng.random() < p else wrong))
        items.append(item)
    return items


def test_the_fit_recovers_unequal_skills_without_labels() -> None:
    fitted = fit_reliabilities(synthetic(600, {"strong1": 0.85, "weak1": 0.6, "weak2": 0.6}, seed=7))
    assert fitted.by_model["strong"] == pytest.approx(0.85, abs=0.04)
    assert fitted.by_model["weak"] == pytest.approx(0.6, abs=0.04)
    assert fitted.coincidence == pytest.approx(1 / 3, abs=0.05)
    assert fitted.panels == 600


def log_posterior(items: list[list[tuple[str, str]]], fit: Reliabilities) -> float:
    """What fit_reliabilities maximises, from its documented parts."""
    value = math.fsum(_log_evidence(_Shape.of(_canonical(item)), fit) for item in items)
    value += math.fsum(_log_beta(v, PRIOR_RELIABILITY) for v in fit.by_model.values())
    value += math.fsum(_log_beta(v, PRIOR_CORRELATION) for v in fit.correlation.values())
    return value + _log_beta(fit.coincidence, PRIOR_COINCIDENCE)


def test_a_fit_on_few_panels_stays_near_the_prior() -> None:
    fitted = fit_reliabilities(synthetic(3, {"m1": 0.95, "m2": 0.95, "m3": 0.95}, seed=1))
    assert 0.7 < fitted.by_model["m"] < 0.95


def test_a_fit_without_history_is_the_prior() -> None:
    fitted = fit_reliabilities([[("m", "")], []])
    assert fitted.by_model == {}
    assert fitted.panels == 0
    assert fitted.of("m") == pytest.approx(0.7)


def test_the_fit_ignores_the_order_of_panels_and_answers() -> None:
    items = synthetic(200, {"a1": 0.8, "b1": 0.6, "b2": 0.6}, seed=3)
    shuffled = [list(reversed(item)) for item in reversed(items)]
    assert fit_reliabilities(items).to_dict() == fit_reliabilities(shuffled).to_dict()


def test_shared_errors_look_like_agreement_to_the_unlabelled_fit() -> None:
    independent = fit_reliabilities(synthetic(300, {"m1": 0.6, "m2": 0.6, "m3": 0.6}, seed=5))
    shared = fit_reliabilities(synthetic(300, {"m1": 0.6, "m2": 0.6, "m3": 0.6}, seed=5, shared=True))
    assert shared.coincidence > 0.9 > independent.coincidence


def _neighbours(fit: Reliabilities, step: float) -> list[Reliabilities]:
    out = []
    for model in fit.by_model:
        for delta in (-step, step):
            out.append(replace(fit, by_model={**fit.by_model, model: fit.by_model[model] + delta}))
            out.append(replace(fit, correlation={**fit.correlation, model: fit.correlation[model] + delta}))
    out += [replace(fit, coincidence=fit.coincidence + d) for d in (-step, step)]
    return [
        f
        for f in out
        if all(0.3 < v < 0.99 for v in f.by_model.values())
        and all(0 < v < 0.99 for v in f.correlation.values())
        and 0.05 < f.coincidence < 1
    ]


def test_the_fit_is_the_maximum_of_the_log_posterior() -> None:
    items = synthetic(300, {"a1": 0.8, "b1": 0.6, "b2": 0.6}, seed=3)
    fitted = fit_reliabilities(items)
    best = log_posterior(items, fitted)
    for step in (0.02, 0.005):
        for other in _neighbours(fitted, step):
            assert log_posterior(items, other) <= best + 1e-6


def test_more_sweeps_do_not_move_a_converged_fit() -> None:
    items = synthetic(300, {"a1": 0.8, "b1": 0.6, "b2": 0.6}, seed=3)
    fitted, longer = fit_reliabilities(items), fit_reliabilities(items, sweeps=6, steps=40)
    # Coordinate ascent stops within a few thousandths of the optimum: far inside the
    # sampling error of 300 panels, and the log posterior is flat to 0.05 there.
    for model in ("a", "b"):
        assert fitted.by_model[model] == pytest.approx(longer.by_model[model], abs=5e-3)
    assert fitted.coincidence == pytest.approx(longer.coincidence, abs=5e-3)
    assert log_posterior(items, fitted) == pytest.approx(log_posterior(items, longer), abs=0.05)


def correlated(panels: int, p: float, c: float, models: list[str], seed: int) -> list[list[tuple[str, str]]]:
    """Panels whose agents of one model repeat the model's own draw with probability c."""
    rng = random.Random(seed)
    items = []
    for _ in range(panels):
        latent = {m: "t" if rng.random() < p else rng.choice("xyz") for m in set(models)}
        own = [
            latent[m] if rng.random() < c else ("t" if rng.random() < p else rng.choice("xyz"))
            for m in models
        ]
        items.append(list(zip(models, own, strict=True)))
    return items


def test_the_fit_sees_agents_of_one_model_that_share_their_errors() -> None:
    models = ["a", "a", "a", "b", "b"]
    shared = fit_reliabilities(correlated(800, 0.7, 0.6, models, seed=2))
    independent = fit_reliabilities(correlated(800, 0.7, 0.0, models, seed=2))
    assert shared.correlation_of("a") == pytest.approx(0.6, abs=0.15)
    assert independent.correlation_of("a") < 0.15
    assert shared.of("a") == pytest.approx(0.7, abs=0.06)


def test_fully_correlated_agents_are_one_witness() -> None:
    one = Reliabilities(by_model={"m": 0.7}, coincidence=1 / 3, default_correlation=0.99)
    alone = posterior([("m", "42")], THIRD).of("42")
    assert posterior([("m", "42")] * 3, one).of("42") == pytest.approx(alone, abs=0.01)
    assert posterior([("m", "42")] * 3, THIRD).of("42") > alone + 0.1


def test_an_uninformed_model_leaves_the_prior() -> None:
    blind = replace(THIRD, uninformed=frozenset({"m"}))
    post = posterior([("m", "42")] * 3, blind)
    assert post.of("42") == pytest.approx(1 / 4)  # 1/s + 1 = 4 plausible values, no evidence
    assert Reliabilities().source == "prior"
    assert fit_reliabilities([[("m", "1")]]).source == "history"


def test_the_default_panel_of_one_model_is_less_sure_than_independent_agents() -> None:
    same = posterior([("m", "42")] * 3, Reliabilities()).of("42")
    mixed = posterior(
        [("a", "42"), ("b", "42"), ("c", "42")], replace(Reliabilities(), default_correlation=0.0)
    ).of("42")
    assert same < mixed


def test_yes_no_panels_do_not_feed_the_coincidence() -> None:
    items = synthetic(300, {"a1": 0.8, "b1": 0.6, "b2": 0.6}, seed=3)
    binary = [[(m, "yes" if k == "t" else "no") for m, k in item] for item in items]
    assert fit_reliabilities(binary).coincidence == Reliabilities().coincidence
    mixed = fit_reliabilities(items + binary)
    assert mixed.coincidence == pytest.approx(fit_reliabilities(items).coincidence, abs=0.05)


# --- Platt recalibration ---------------------------------------------------------------------------


def test_platt_is_the_identity_below_the_minimum() -> None:
    scaling = PlattScaling.fit([(0.9, False)] * (MIN_LABELLED - 1))
    assert (scaling.a, scaling.b, scaling.labelled) == (1.0, 0.0, MIN_LABELLED - 1)
    assert scaling(0.9) == 0.9
    assert scaling(1.5) == 1.0


def test_platt_pulls_an_overconfident_model_down() -> None:
    outcomes = [(0.9, i % 10 < 6) for i in range(100)] + [(0.6, i % 10 < 4) for i in range(100)]
    scaling = PlattScaling.fit(outcomes)
    assert scaling.labelled == 200
    assert scaling(0.9) == pytest.approx(0.6, abs=0.03)
    assert scaling(0.6) == pytest.approx(0.4, abs=0.03)
    assert scaling.a >= 0


def test_platt_never_reverses_the_order() -> None:
    outcomes = [(0.9, False)] * 40 + [(0.2, True)] * 40
    scaling = PlattScaling.fit(outcomes)
    assert scaling.a == 0.0
    assert scaling(0.9) == pytest.approx(scaling(0.2))


def penalised_gradient(
    outcomes: list[tuple[float, bool]], a: float, b: float, ridge: float
) -> tuple[float, float]:
    """The gradient in (a, b) of the log-likelihood minus ridge/2 x ((a - 1)^2 + b^2) (PlattScaling.fit)."""
    ga, gb = -ridge * (a - 1), -ridge * b
    for p, right in outcomes:
        x = math.log(min(max(p, 1e-6), 1 - 1e-6) / (1 - min(max(p, 1e-6), 1 - 1e-6)))
        residual = (1.0 if right else 0.0) - 1 / (1 + math.exp(-(a * x + b)))
        ga += residual * x
        gb += residual
    return ga, gb


def test_platt_fit_is_the_penalised_maximum() -> None:
    outcomes = [(0.9, i % 10 < 6) for i in range(100)] + [(0.6, i % 10 < 4) for i in range(100)]
    outcomes += [(0.3, i % 4 == 0) for i in range(40)]
    for ridge in (1.0, 0.5):
        scaling = PlattScaling.fit(outcomes, ridge=ridge)
        assert 0.0 < scaling.a < 1.0
        ga, gb = penalised_gradient(outcomes, scaling.a, scaling.b, ridge)
        assert abs(ga) < 1e-9
        assert abs(gb) < 1e-9
    # ridge defaults to 1
    assert PlattScaling.fit(outcomes) == PlattScaling.fit(outcomes, ridge=1.0)


def test_platt_with_an_uninformative_confidence_predicts_the_accuracy() -> None:
    # Higher raw confidence goes with more errors: a is held at 0, and b is then the best
    # constant, so every answer gets (nearly) the observed accuracy of 30/75.
    outcomes = [(0.9, False)] * 40 + [(0.2, True)] * 20 + [(0.5, True)] * 10 + [(0.7, False)] * 5
    scaling = PlattScaling.fit(outcomes)
    assert scaling.a == 0.0
    ga, gb = penalised_gradient(outcomes, scaling.a, scaling.b, 1.0)
    assert abs(gb) < 1e-9
    assert ga < 0  # the likelihood would want a < 0: the constraint holds it at 0
    assert scaling(0.9) == scaling(0.2) == pytest.approx(0.405, abs=0.002)


@pytest.mark.parametrize(
    ("raw", "accuracy"), [(0.0, 0.25), (0.5, 0.25), (0.9, 0.25), (1.0, 0.25), (0.99, 0.5), (0.99, 0.9)]
)
def test_platt_with_a_single_raw_confidence_converges_to_its_accuracy(raw: float, accuracy: float) -> None:
    # One raw value: a plain Newton step overshoots here (it used to end at a = 277 for
    # raw = 1.0 and a quarter right, mapping 1.0 to 1.0); the fit is the maximum instead.
    outcomes = [(raw, i < accuracy * 40) for i in range(40)]
    scaling = PlattScaling.fit(outcomes)
    ga, gb = penalised_gradient(outcomes, scaling.a, scaling.b, 1.0)
    assert abs(gb) < 1e-9
    assert abs(ga) < 1e-9 or (scaling.a == 0.0 and ga < 0)
    assert scaling(raw) == pytest.approx(accuracy, abs=0.03)


def test_platt_maps_through_the_logit() -> None:
    assert PlattScaling(a=2.0, b=0.5)(0.8) == pytest.approx(1 / (1 + math.exp(-2 * math.log(4) - 0.5)))
    assert PlattScaling(a=0.5, b=-1.0)(0.2) == pytest.approx(1 / (1 + math.exp(0.5 * math.log(4) + 1)))
    # Raw 0 and 1 are read as 1e-6 and 1 - 1e-6: sigmoid(2 logit(q)) = q^2 / (q^2 + (1 - q)^2).
    sharp = PlattScaling(a=2.0, b=0.0)
    assert sharp(0.0) == sharp(1e-6) == pytest.approx(1e-12 / (1e-12 + (1 - 1e-6) ** 2))
    assert sharp(1.0) == sharp(1 - 1e-6) == pytest.approx((1 - 1e-6) ** 2 / ((1 - 1e-6) ** 2 + 1e-12))
    steep = PlattScaling(a=100.0, b=0.0)
    assert (steep(0.0), steep(1.0)) == (0.0, 1.0)


def test_platt_defaults_to_the_identity_without_labels() -> None:
    identity = PlattScaling()
    assert (identity.a, identity.b, identity.labelled) == (1.0, 0.0, 0)
    assert (identity(0.3), identity(-0.5), identity(1.5)) == (0.3, 0.0, 1.0)


def test_platt_is_fitted_from_30_labelled_outcomes() -> None:
    outcomes = [(0.9, i % 10 < 6) for i in range(30)]
    assert PlattScaling.fit(outcomes[:29]) == PlattScaling(labelled=29)
    fitted = PlattScaling.fit(outcomes)
    assert fitted.labelled == 30
    assert fitted(0.9) == pytest.approx(0.6, abs=0.05)


def test_platt_without_a_ridge_is_the_maximum_likelihood_fit() -> None:
    # Two raw values: the unpenalised fit maps each to its observed accuracy.
    outcomes = [(0.5, i < 7) for i in range(15)] + [(0.52, i < 10) for i in range(15)]
    plain = PlattScaling.fit(outcomes, ridge=0.0)
    assert plain(0.5) == pytest.approx(7 / 15)
    assert plain(0.52) == pytest.approx(10 / 15)
    # One raw value of 0.5 (logit 0) leaves a undetermined: the fit stops instead of dividing by 0.
    assert PlattScaling.fit([(0.5, i < 7) for i in range(30)], ridge=0.0) == PlattScaling(labelled=30)


def test_calibration_errors() -> None:
    errors = calibration_errors([(0.9, True), (0.9, False), (0.1, False), (0.1, False)])
    assert errors["confidence"] == pytest.approx(0.5)
    assert errors["accuracy"] == pytest.approx(0.25)
    assert errors["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert errors["brier"] == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    assert math.isnan(calibration_errors([])["ece"])
    assert calibration_errors([(1.0, True)])["ece"] == 0.0


def test_calibration_errors_use_ten_equal_bins_the_last_one_closed() -> None:
    outcomes = [(1.0, False), (0.95, True), (0.85, True), (0.41, True), (0.48, False)]
    # [0.9, 1.0]: mean 0.975, accuracy 1/2; [0.8, 0.9): 0.85 vs 1; [0.4, 0.5): 0.445 vs 1/2.
    expected = 2 / 5 * 0.475 + 1 / 5 * 0.15 + 2 / 5 * 0.055
    assert calibration_errors(outcomes)["ece"] == pytest.approx(expected)
    assert calibration_errors(outcomes, bins=1)["ece"] == pytest.approx(abs(3.69 / 5 - 3 / 5))


# --- the reliability vote ----------------------------------------------------------------------------


def three_way() -> tuple[list[Ballot], list[Option]]:
    options = [
        Option(label=label, position=key, key=key, supporters=(voter,))
        for label, key, voter in (("A", "1", "a0"), ("B", "2", "a1"), ("C", "3", "a2"))
    ]
    ballots = [Ballot(voter=f"a{i}", choice=label, confidence=0.5) for i, label in enumerate("CBA")]
    return ballots, options


def test_the_reliable_voter_settles_a_three_way_split() -> None:
    ballots, options = three_way()
    decision = reliability_vote(ballots, options, electorate=3, weights={"a0": 2.8, "a1": 1.5, "a2": 1.5})
    assert decision.winner == "C"  # a0 voted C
    assert decision.method == "reliability"
    assert decision.tie_break is None
    assert decision.tallies == {"A": 1.5, "B": 1.5, "C": 2.8}


def test_without_weights_the_reliability_vote_is_the_majority_vote() -> None:
    ballots, options = three_way()
    ballots[2] = Ballot(voter="a2", choice="C", confidence=0.5)
    decision = reliability_vote(ballots, options, electorate=3)
    assert decision.winner == "C"
    assert decision.tallies == {"A": 0.0, "B": 1.0, "C": 2.0}


def test_a_zero_weight_ballot_still_counts_a_little() -> None:
    ballots, options = three_way()
    decision = reliability_vote(ballots, options, electorate=3, weights={"a0": 0.0, "a1": 0.0, "a2": 0.0})
    assert decision.tallies == {"A": 0.05, "B": 0.05, "C": 0.05}


# --- properties ------------------------------------------------------------------------------------

MODELS = st.sampled_from(["m1", "m2", "m3"])
KEYS = st.sampled_from(["1", "2", "3", "yes", "no", ""])
PANELS = st.lists(st.tuples(MODELS, KEYS), min_size=0, max_size=7)
FITS = st.builds(
    Reliabilities,
    by_model=st.dictionaries(MODELS, st.floats(0.0, 1.0)),
    coincidence=st.floats(0.0, 1.0),
)


@PROPERTY
@given(PANELS, FITS)
def test_probabilities_stay_in_the_unit_interval_and_sum_to_one(answers, fitted) -> None:
    post = posterior(answers, fitted)
    for p in [*post.probabilities.values(), post.none]:
        assert 0.0 <= p <= 1.0
    if post.probabilities:
        assert math.fsum(post.probabilities.values()) + post.none == pytest.approx(1.0)


@PROPERTY
@given(PANELS, FITS, st.randoms(use_true_random=False))
def test_the_order_of_the_answers_never_matters(answers, fitted, rng) -> None:
    shuffled = list(answers)
    rng.shuffle(shuffled)
    left, right = posterior(answers, fitted), posterior(shuffled, fitted)
    assert left.probabilities.keys() == right.probabilities.keys()
    for key in left.probabilities:
        assert left.probabilities[key] == pytest.approx(right.probabilities[key])


@PROPERTY
@given(PANELS, FITS, MODELS, st.sampled_from(["1", "2", "yes"]))
def test_one_more_supporter_never_lowers_an_answers_probability(answers, fitted, model, key) -> None:
    keys = {k for _, k in answers if k}
    if key not in keys or is_binary(keys) != is_binary(keys | {key}):
        return
    before = posterior(answers, fitted).of(key)
    after = posterior([*answers, (model, key)], fitted).of(key)
    assert after >= before - 1e-12


@PROPERTY
@given(PANELS, FITS, MODELS)
def test_winning_over_a_dissenter_never_lowers_the_confidence(answers, fitted, model) -> None:
    keys = sorted({k for _, k in answers if k})
    if len(keys) < 2:
        return
    winner, other = keys[0], keys[1]
    index = next((i for i, (_, k) in enumerate(answers) if k == other), None)
    assert index is not None
    switched = list(answers)
    switched[index] = (answers[index][0], winner)
    assert posterior(switched, fitted).of(winner) >= posterior(answers, fitted).of(winner) - 1e-12


@PROPERTY
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=0, max_size=80), st.floats(0.0, 1.0))
def test_recalibrated_confidence_stays_in_the_unit_interval(outcomes, p) -> None:
    assert 0.0 <= PlattScaling.fit(outcomes)(p) <= 1.0
