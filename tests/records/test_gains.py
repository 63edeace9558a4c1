"""The ceiling rule's three answers, and the seeds it asks for when it cannot tell, checked against scipy's
t-test on simulated seeds of the observed mean and spread."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from gradconflict.diagnosis.next_step import MAX_SEEDS as NEXT_STEP_SEEDS
from gradconflict.records.gains import GAIN_ALPHA, MAX_SEEDS, PLAN_POWER, judge_gain


def _simulated_power(mean: float, sd: float, n: int, draws: int = 40_000) -> float:
    """The share of ``draws`` experiments of ``n`` normal seeds (this mean and spread) that scipy's one-sided
    t-test against the 1% floor confirms at the rule's level: the power, by simulation."""
    seeds = np.random.default_rng(0).normal(mean, sd, size=(draws, n))
    return float(np.mean(stats.ttest_1samp(seeds, 1.0, axis=1, alternative="greater").pvalue < GAIN_ALPHA))


def _false_wins(alpha: float, experiments: int = 3000) -> float:
    """The share of ``experiments`` whose gains (normal, true mean exactly at the 1% floor) the next step's looks
    call a win at ``alpha``: three seeds; when they cannot tell, the seeds planned from them; when those still
    cannot tell, the next step's cap. scipy's t-test draws each look's verdict; the plans are the rule's own."""
    rng = np.random.default_rng(1)
    wins = 0
    for _ in range(experiments):
        gains = list(rng.normal(1.0, 1.0, size=3))
        test = judge_gain(gains, alpha=alpha)
        for last in (False, True):
            if not test.seeds_needed or len(gains) >= NEXT_STEP_SEEDS:
                break
            more = NEXT_STEP_SEEDS if last else min(test.seeds_needed, NEXT_STEP_SEEDS)
            gains += list(rng.normal(1.0, 1.0, size=more - len(gains)))
            test = judge_gain(gains, alpha=alpha)
        wins += stats.ttest_1samp(gains, 1.0, alternative="greater").pvalue < alpha
    return wins / experiments


def test_the_next_steps_looks_at_the_rules_level_call_a_gain_at_the_floor_a_win_at_most_one_time_in_twenty():
    # A comparison whose first three seeds cannot tell is read again on the seeds planned from them, and once
    # more on the cap when those cannot tell either; at the floor (no gain worth a split) the readings together
    # must keep the 5% convention. Readings at 5% each do not: the check can fail.
    error = math.sqrt(0.05 * 0.95 / 3000)
    assert _false_wins(GAIN_ALPHA) <= 0.05 + 2 * error
    assert _false_wins(0.05) > 0.05 + 2 * error


@pytest.mark.parametrize("per_seed", [
    [12.4, 13.8, 64.6], [3.0, 9.0, 1.5, 6.0], [40.0, -5.0, -3.0], [1.0, 1.11, 0.91], [6.0, -4.0, 2.0],
    [9.0, -4.0, 12.0, -2.0, 9.0, 1.0, -3.0, 5.0],  # 80% power needs more than 20 seeds
])
def test_an_unconfirmed_gain_asks_for_the_seeds_that_would_confirm_it_four_times_in_five(per_seed):
    test = judge_gain(per_seed)
    assert test.mean > 1.0 and test.p_value >= GAIN_ALPHA
    mean, sd = statistics.fmean(per_seed), statistics.stdev(per_seed)
    n = test.seeds_needed
    least_sd = sd * math.sqrt((len(per_seed) - 1) / stats.chi2.ppf(0.9, len(per_seed) - 1))  # 90% lower bound
    if n is None:  # MAX_SEEDS would confirm it less than half the time, even at the spread's lower bound
        assert test.beyond is False
        assert _simulated_power(mean, least_sd, MAX_SEEDS) < 0.5 + 0.01
        return
    assert test.beyond is None
    # with n seeds of this mean and spread the same test confirms the gain with the planned power; with one fewer
    # it does not (to a simulation's error)
    assert _simulated_power(mean, sd, n - 1) < PLAN_POWER + 0.01
    if n < MAX_SEEDS:
        assert _simulated_power(mean, sd, n) > PLAN_POWER - 0.01
    else:  # the most the plan proposes: at least even odds there, at the spread's lower bound
        assert _simulated_power(mean, least_sd, MAX_SEEDS) > 0.5 - 0.01


def test_the_three_answers():
    assert judge_gain([25.5, 26.0, 29.4]).beyond is True and judge_gain([25.5, 26.0, 29.4]).seeds_needed is None
    assert judge_gain([0.2, -0.5, 0.9]).beyond is False  # not above the 1% floor on average
    assert judge_gain([-30.0, -10.0, -20.0]).beyond is False
    one = judge_gain([12.0])
    assert one.beyond is None and one.seeds_needed is None and math.isnan(one.p_value)


def test_a_gain_the_most_planned_seeds_did_not_confirm_is_no_gain():
    # Ahead by 5% on average over 20 seeds at a spread of 10%: p = 0.045, not confirmed at 2.5% where the plan
    # stops; at that spread's lower bound, 20 seeds would confirm such a gain about half the time, so the plan would
    # otherwise ask for the 20 seeds already run.
    draws = np.random.default_rng(3).normal(0.0, 1.0, size=MAX_SEEDS)
    per_seed = list(5.0 + 10.0 * (draws - draws.mean()) / draws.std(ddof=1))
    assert GAIN_ALPHA < stats.ttest_1samp(per_seed, 1.0, alternative="greater").pvalue < 0.05
    assert judge_gain(per_seed).beyond is False and judge_gain(per_seed).seeds_needed is None
    fewer = judge_gain(per_seed[:-1])  # one seed fewer: the plan still has a seed to run
    assert fewer.beyond is None and fewer.seeds_needed == MAX_SEEDS
