"""The ceiling rule's three answers, and the seeds it asks for when it cannot tell, checked against scipy's
t-test on simulated seeds of the observed mean and spread."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from gradconflict.records.gains import MAX_SEEDS, PLAN_POWER, judge_gain


def _simulated_power(mean: float, sd: float, n: int, draws: int = 40_000) -> float:
    """The share of ``draws`` experiments of ``n`` normal seeds (this mean and spread) that scipy's one-sided
    t-test against the 1% floor confirms: the power, by simulation."""
    seeds = np.random.default_rng(0).normal(mean, sd, size=(draws, n))
    return float(np.mean(stats.ttest_1samp(seeds, 1.0, axis=1, alternative="greater").pvalue < 0.05))


@pytest.mark.parametrize("per_seed", [
    [12.4, 13.8, 64.6], [3.0, 9.0, 1.5, 6.0], [40.0, -5.0, -3.0], [1.0, 1.11, 0.91], [6.0, -4.0, 2.0],
    [9.0, -4.0, 12.0, -2.0, 9.0, 1.0, -3.0, 5.0],  # 80% power needs more than 20 seeds
])
def test_an_unconfirmed_gain_asks_for_the_seeds_that_would_confirm_it_four_times_in_five(per_seed):
    test = judge_gain(per_seed)
    assert test.mean > 1.0 and test.p_value >= 0.05
    mean, sd = statistics.fmean(per_seed), statistics.stdev(per_seed)
    n = test.seeds_needed
    if n is None:  # MAX_SEEDS would confirm it less than half the time, even at the spread's 90% lower bound
        assert test.beyond is False
        least_sd = sd * math.sqrt((len(per_seed) - 1) / stats.chi2.ppf(0.9, len(per_seed) - 1))
        assert _simulated_power(mean, least_sd, MAX_SEEDS) < 0.5 + 0.01
        return
    assert test.beyond is None
    # with n seeds of this mean and spread the same test confirms the gain with the planned power; with one fewer
    # it does not (to a simulation's error)
    assert _simulated_power(mean, sd, n - 1) < PLAN_POWER + 0.01
    if n < MAX_SEEDS:
        assert _simulated_power(mean, sd, n) > PLAN_POWER - 0.01
    else:  # the most the plan proposes: at least even odds there
        assert _simulated_power(mean, sd, MAX_SEEDS) > 0.5 - 0.01


def test_the_three_answers():
    assert judge_gain([25.5, 26.0, 29.4]).beyond is True and judge_gain([25.5, 26.0, 29.4]).seeds_needed is None
    assert judge_gain([0.2, -0.5, 0.9]).beyond is False  # not above the 1% floor on average
    assert judge_gain([-30.0, -10.0, -20.0]).beyond is False
    one = judge_gain([12.0])
    assert one.beyond is None and one.seeds_needed is None and math.isnan(one.p_value)
