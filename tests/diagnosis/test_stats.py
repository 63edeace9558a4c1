"""The persistence tests against independent references: scipy's exact binomial test, the closed-form
autocorrelation time of a Markov chain of signs, and the normal-approximation sample size."""

import math

import numpy as np
import pytest
from scipy import stats

from gradconflict.diagnosis.stats import (
    SMALL_EFFECT,
    autocorrelation_time,
    binomial_tail,
    effect_size,
    persistence_tests,
    rate_at_effect,
    signs,
)


def _series(conflicts, agreements, ties=0):
    values = [1] * conflicts + [-1] * agreements + [0] * ties
    return np.array(values, dtype=np.int8)[:, None]


@pytest.mark.parametrize(("k", "n"), [(0, 5), (3, 10), (9, 10), (10, 10), (31, 50)])
def test_binomial_tail_is_scipys_exact_binomial(k, n):
    assert binomial_tail(np.array(k), np.array(n), 0.5, upper=True) == pytest.approx(
        stats.binomtest(k, n, 0.5, alternative="greater").pvalue, rel=1e-10
    )
    assert binomial_tail(np.array(k), np.array(n), 0.6, upper=False) == pytest.approx(
        stats.binom.cdf(k, n, 0.6), rel=1e-10
    )


def test_independent_steps_give_scipys_sign_test():
    # Alternating blocks of one conflict and one agreement show no positive autocorrelation: tau = 1, and the test
    # is the exact one-sided binomial test of the counts.
    sign = np.array([1, 1, -1, 1, -1, 1, 1, 1, -1, 1, 1, -1, 1, 1, 1, -1, 1, 1, 1, 1], dtype=np.int8)[:, None]
    t = persistence_tests(sign, np.ones_like(sign, dtype=bool))
    assert t.tau[0] == 1.0 and (t.conflicts[0], t.agreements[0]) == (15, 5)
    assert t.p_conflict[0] == pytest.approx(stats.binomtest(15, 20, 0.5, alternative="greater").pvalue)
    assert t.rate[0] == pytest.approx(0.75) and t.persistence[0] == pytest.approx(0.75)


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
    runs = np.repeat(np.array([1, -1, 1, 1, -1, 1, 1, 1], dtype=np.int8), 5)[:, None]
    shuffled = rng.permutation(runs)
    present = np.ones_like(runs, dtype=bool)
    slow, quick = persistence_tests(runs, present), persistence_tests(shuffled, present)
    assert slow.conflicts[0] == quick.conflicts[0] == 30
    assert slow.tau[0] > 2 * quick.tau[0] and slow.p_conflict[0] > 10 * quick.p_conflict[0]


def test_effect_size_is_cohens_h():
    assert effect_size(0.5) == pytest.approx(0.0)
    assert effect_size(0.75) == pytest.approx(2 * math.asin(math.sqrt(0.75)) - 2 * math.asin(math.sqrt(0.5)))
    assert effect_size(rate_at_effect(SMALL_EFFECT)) == pytest.approx(SMALL_EFFECT)


def test_classification_persistent_ruled_out_at_chance_undetermined():
    present = np.ones((200, 1), dtype=bool)
    rng = np.random.default_rng(2)

    def draw(rate, n=200):
        return np.where(rng.random(n) < rate, 1, -1).astype(np.int8)[:, None]

    persistent = persistence_tests(draw(0.9), present)
    assert persistent.persistent(0.05)[0] and not persistent.ruled_out(0.05)[0]
    agreeing = persistence_tests(draw(0.05), present)
    assert agreeing.ruled_out(0.05)[0] and not agreeing.at_chance(0.05)[0] and agreeing.steps_needed[0] == 0
    coin = persistence_tests(draw(0.5), present)
    assert coin.ruled_out(0.05)[0] and coin.at_chance(0.05)[0] and not coin.persistent(0.05)[0]
    few = persistence_tests(_series(4, 1), np.ones((5, 1), dtype=bool))
    assert few.undetermined(0.05)[0] and 0 < few.steps_needed[0] < np.inf


def test_steps_needed_settles_the_test_at_the_same_rate():
    # 7 conflicts of 10 steps is not yet significant; at the same rate, the suggested total is (about) enough.
    few = persistence_tests(_series(7, 3), np.ones((10, 1), dtype=bool))
    assert few.undetermined(0.05)[0]
    total = int(10 + few.steps_needed[0])
    k = round(0.7 * total)
    assert stats.binomtest(k, total, 0.5, alternative="greater").pvalue < 0.06
    assert stats.binomtest(round(0.7 * 10), 10, 0.5, alternative="greater").pvalue > 0.05


def test_ties_and_pairs_never_measured():
    assert signs(np.array([[-0.5, np.nan], [0.2, 0.0]]), 0.0).tolist() == [[1, 0], [-1, 0]]  # 0: a tie (zero norm)
    assert signs(np.array([0.05]), 0.3).tolist() == [-1]  # a positive S is judged by the sign
    t = persistence_tests(np.zeros((4, 2), dtype=np.int8), np.array([[1, 0]] * 4, dtype=bool))
    assert t.steps.tolist() == [4, 0] and np.isnan(t.rate).all() and np.isnan(t.p_conflict).all()
    assert t.ruled_out(0.05).tolist() == [True, False]  # always inside the dead zone: no conflict in S's sense
    assert not t.undetermined(0.05).any()


def test_benjamini_hochberg_over_the_family():
    alternating = np.array([1, -1] * 7, dtype=np.int8)[:, None]  # no positive dependence: tau = 1
    sign = np.concatenate([_series(12, 2), _series(12, 2), alternating], axis=1)
    t = persistence_tests(sign, np.ones_like(sign, dtype=bool))
    assert t.p_adjusted == pytest.approx(stats.false_discovery_control(t.p_conflict, method="bh"))
    assert t.take([2]).p_adjusted == pytest.approx(t.p_adjusted[2:])  # the family's adjustment is kept
    assert t.p_agreement[2] == pytest.approx(stats.binomtest(7, 14, 0.5, alternative="less").pvalue)
