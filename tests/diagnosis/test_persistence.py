"""The persistence tests against independent references: scipy's exact binomial test and one-sample t-test, the
closed-form autocorrelation time of a Markov chain of signs, and the normal-approximation sample size."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from gradconflict.diagnosis.persistence import (
    SMALL_EFFECT,
    autocorrelation_time,
    binomial_tail,
    effect_size,
    minimum_effective_steps,
    persistence_tests,
    rate_at_effect,
    signs,
)


def _cosines(sign, magnitude=0.5):
    """A column of cosines from signs (+1 conflict -> -magnitude, -1 agreement -> +magnitude, 0 -> 0)."""
    return (-magnitude * np.asarray(sign, dtype=np.float64)).reshape(-1, 1)


def _series(conflicts, agreements):
    return _cosines([1] * conflicts + [-1] * agreements)


@pytest.mark.parametrize(("k", "n"), [(0, 5), (3, 10), (9, 10), (10, 10), (31, 50)])
def test_binomial_tail_is_scipys_exact_binomial(k, n):
    assert binomial_tail(np.array(k), np.array(n), 0.5, upper=True) == pytest.approx(
        stats.binomtest(k, n, 0.5, alternative="greater").pvalue, rel=1e-10
    )
    assert binomial_tail(np.array(k), np.array(n), 0.6, upper=False) == pytest.approx(
        stats.binom.cdf(k, n, 0.6), rel=1e-10
    )


def test_independent_steps_give_scipys_sign_test():
    # No positive autocorrelation in this sequence: tau = 1, and the test is the exact one-sided binomial test.
    sign = [1, 1, -1, 1, -1, 1, 1, 1, -1, 1, 1, -1, 1, 1, 1, -1, 1, 1, 1, 1]
    t = persistence_tests(_cosines(sign))
    assert t.tau[0] == 1.0 and (t.conflicts[0], t.agreements[0]) == (15, 5)
    assert t.p_conflict[0] == pytest.approx(stats.binomtest(15, 20, 0.5, alternative="greater").pvalue)
    assert t.rate[0] == pytest.approx(0.75) and t.persistence[0] == pytest.approx(0.75)
    assert t.mean_cosine[0] == pytest.approx((15 * -0.5 + 5 * 0.5) / 20)


def test_autocorrelation_time_of_a_markov_chain_of_signs():
    # A sign that flips with probability q each step has rho_k = (1 - 2q)^k, so tau = (1 + rho) / (1 - rho).
    rng = np.random.default_rng(0)
    for q in (0.1, 0.25):
        flips = rng.random(200_000) < q
        series = np.where(np.cumsum(flips) % 2 == 0, 1.0, -1.0)
        rho = 1 - 2 * q
        assert autocorrelation_time(series) == pytest.approx((1 + rho) / (1 - rho), rel=0.05)
    assert autocorrelation_time(np.ones(50)) == 1.0 and autocorrelation_time(np.array([1.0, -1.0])) == 1.0


def test_dependent_steps_count_less():
    # The same 30 conflicts and 10 agreements, in long runs (persistent regimes) and shuffled.
    rng = np.random.default_rng(1)
    runs = np.repeat(np.array([1, -1, 1, 1, -1, 1, 1, 1]), 5)
    slow, quick = persistence_tests(_cosines(runs)), persistence_tests(_cosines(rng.permutation(runs)))
    assert slow.conflicts[0] == quick.conflicts[0] == 30
    assert slow.tau[0] > 2 * quick.tau[0] and slow.p_conflict[0] > 10 * quick.p_conflict[0]


def test_effect_size_is_cohens_h():
    assert effect_size(0.5) == pytest.approx(0.0)
    assert effect_size(0.75) == pytest.approx(2 * math.asin(math.sqrt(0.75)) - 2 * math.asin(math.sqrt(0.5)))
    assert effect_size(rate_at_effect(SMALL_EFFECT)) == pytest.approx(SMALL_EFFECT)


def test_classification_persistent_ruled_out_at_chance_undetermined():
    rng = np.random.default_rng(2)

    def draw(rate, n=200):
        return _cosines(np.where(rng.random(n) < rate, 1, -1))

    persistent = persistence_tests(draw(0.9))
    assert persistent.persistent(0.05)[0] and not persistent.ruled_out(0.05)[0]
    agreeing = persistence_tests(draw(0.05))
    assert agreeing.ruled_out(0.05)[0] and not agreeing.at_chance(0.05)[0] and agreeing.steps_needed[0] == 0
    coin = persistence_tests(_cosines(rng.permutation([1, -1] * 100)))
    assert coin.ruled_out(0.05)[0] and coin.at_chance(0.05)[0] and not coin.persistent(0.05)[0]
    few = persistence_tests(_series(4, 1))
    assert few.undetermined(0.05)[0] and 0 < few.steps_needed[0] < np.inf


def test_a_frequent_but_tiny_conflict_is_not_persistent():
    # Negative on 90% of the steps, but the cosines hover around -0.03: the gradients are nearly orthogonal. The
    # magnitude test is scipy's one-sample t-test of mean > -0.1 (independent steps here: tau = 1).
    rng = np.random.default_rng(3)
    cos = -0.03 + 0.02 * rng.standard_normal(200)
    t = persistence_tests(cos[:, None])
    assert t.rate[0] > 0.8 and t.p_adjusted[0] < 1e-6  # frequent and significant...
    assert not t.persistent(0.05)[0] and t.ruled_out(0.05)[0]  # ...but weaker than a small correlation
    if t.tau[0] == 1.0:
        assert t.p_weak[0] == pytest.approx(stats.ttest_1samp(cos, -0.1, alternative="greater").pvalue, rel=1e-6)


def test_steps_needed_settles_the_test_at_the_same_rate():
    # 7 conflicts of 10 steps is not yet significant; at the same rate, the suggested total is (about) enough.
    few = persistence_tests(_cosines([1, 1, -1, 1, 1, -1, 1, 1, -1, 1]))
    assert few.undetermined(0.05)[0] and few.tau[0] == 1.0
    total = int(10 + few.steps_needed[0])
    assert stats.binomtest(math.ceil(0.7 * total), total, 0.5, alternative="greater").pvalue < 0.05
    assert stats.binomtest(7, 10, 0.5, alternative="greater").pvalue > 0.05


def test_ties_and_pairs_never_measured():
    assert signs(np.array([[-0.5, np.nan], [0.2, 0.0]]), 0.0).tolist() == [[1, 0], [-1, 0]]  # 0: a tie
    assert signs(np.array([0.05]), 0.3).tolist() == [-1]  # a positive S is judged by the sign
    cos = np.array([[-0.05, np.nan]] * 5)  # always inside the dead zone of S = -0.1; never measured
    t = persistence_tests(cos, threshold=-0.1)
    assert t.steps.tolist() == [5, 0] and np.isnan(t.rate).all() and np.isnan(t.p_conflict).all()
    assert t.ruled_out(0.05).tolist() == [True, False]
    assert not t.undetermined(0.05).any()
    short = persistence_tests(cos[:4], threshold=-0.1)  # under the minimum of 5 effective steps: not settled yet
    assert short.undetermined(0.05).tolist() == [True, False] and short.steps_needed[0] == 1


def test_benjamini_hochberg_over_the_family():
    alternating = _cosines([1, -1] * 7)  # no positive dependence: tau = 1
    cos = np.concatenate([_series(12, 2), _series(12, 2), alternating], axis=1)
    t = persistence_tests(cos)
    assert t.p_adjusted == pytest.approx(stats.false_discovery_control(t.p_conflict, method="bh"))
    assert t.take([2]).p_adjusted == pytest.approx(t.p_adjusted[2:])  # the family's adjustment is kept
    assert t.p_agreement[2] == pytest.approx(stats.binomtest(7, 14, 0.5, alternative="less").pvalue)


def test_the_old_module_paths_still_work_with_a_warning():
    import importlib
    import sys

    from gradconflict.diagnosis import conflicts, persistence

    sys.modules.pop("gradconflict.diagnosis.stats", None)
    with pytest.warns(DeprecationWarning, match="gradconflict.diagnosis.persistence"):
        old = importlib.import_module("gradconflict.diagnosis.stats")
    assert old is persistence and old.PersistenceTests is persistence.PersistenceTests
    with pytest.warns(DeprecationWarning, match="gradconflict.diagnosis.conflicts.ConflictTests"):
        assert persistence.ConflictTests is conflicts.ConflictTests
    with pytest.warns(DeprecationWarning, match="conflicts.conflict_tests"):
        assert persistence.conflict_tests is conflicts.conflict_tests


def test_minimum_effective_steps_is_where_the_exact_test_can_first_reject():
    # Independent reference: scipy's exact binomial test of n conflicts out of n against 1/2.
    for alpha in (0.05, 0.01, 0.1):
        n = minimum_effective_steps(alpha)
        assert stats.binomtest(n, n, 0.5, alternative="greater").pvalue < alpha
        assert stats.binomtest(n - 1, n - 1, 0.5, alternative="greater").pvalue >= alpha


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=minimum_effective_steps(0.05) - 1),
    st.integers(min_value=1, max_value=3),
    st.data(),
)
def test_no_series_shorter_than_the_minimum_is_settled(steps, series, data):
    cosine = np.array(
        data.draw(st.lists(st.lists(st.sampled_from([-1.0, -0.9, -0.3, -0.05, 0.0, 0.05, 0.4, 1.0]),
                                    min_size=series, max_size=series), min_size=steps, max_size=steps))
    )
    t = persistence_tests(cosine)
    assert not (t.persistent(0.05) | t.ruled_out(0.05) | t.at_chance(0.05)).any()
    # the steps asked for reach at least the minimum (the test that will be run can then settle them)
    assert (t.steps + t.steps_needed >= minimum_effective_steps(0.05) * t.tau).all()


def test_steps_needed_for_the_magnitude_follows_the_t_test():
    # Every step conflicts, weakly: mean cosine -0.0755, above -0.1; only the magnitude t-test can settle it.
    cosine = np.array([[-0.001], [-0.15]] * 4)  # alternating: tau = 1 for the cosine and the (constant) sign
    t = persistence_tests(cosine)
    assert t.undetermined(0.05)[0]
    total = int(t.steps[0] + t.steps_needed[0])
    mean, sd = float(cosine.mean()), float(cosine.std(ddof=1))

    def p_at(n: int) -> float:  # independent reference: scipy's one-sided t-test of "mean > -0.1" on n steps
        return float(stats.ttest_1samp(mean + sd * _standardized(n), -0.1, alternative="greater").pvalue)

    assert p_at(total) < 0.05 <= p_at(total - 2)  # the grid's resolution may overshoot by a step
    longer = persistence_tests(np.array([[-0.001], [-0.15]] * (total // 2 + 1)))
    assert longer.ruled_out(0.05)[0]


def _standardized(n: int) -> np.ndarray:
    """``n`` values with mean 0 and standard deviation 1 (``ddof=1``)."""
    x = np.resize([1.0, -1.0], n)
    x = x - x.mean()
    return x / x.std(ddof=1)
