"""The ceiling rule's three answers, and the seeds it asks for when it cannot tell, checked against scipy's
t-test on samples built to have the observed mean and spread."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from gradconflict.records.gains import MAX_SEEDS, judge_gain


def _sample(mean: float, sd: float, n: int) -> list[float]:
    """``n`` values with exactly this mean and sample standard deviation."""
    z = np.linspace(-1.0, 1.0, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return list(mean + sd * z)


@pytest.mark.parametrize("per_seed", [[12.4, 13.8, 64.6], [3.0, 9.0, 1.5, 6.0], [40.0, -5.0, -3.0], [1.0, 1.11, 0.91]])
def test_an_unconfirmed_gain_asks_for_the_seeds_that_would_confirm_it(per_seed):
    test = judge_gain(per_seed)
    assert test.mean > 1.0 and test.p_value >= 0.05
    mean, sd = statistics.fmean(per_seed), statistics.stdev(per_seed)
    n = test.seeds_needed
    if n is None:  # not even MAX_SEEDS would confirm it: no gain worth a split
        assert test.beyond is False
        assert stats.ttest_1samp(_sample(mean, sd, MAX_SEEDS), 1.0, alternative="greater").pvalue >= 0.05
        return
    assert test.beyond is None
    # with n seeds of this mean and spread the same one-sided test rejects; with one fewer it does not
    assert stats.ttest_1samp(_sample(mean, sd, n), 1.0, alternative="greater").pvalue < 0.05
    assert stats.ttest_1samp(_sample(mean, sd, n - 1), 1.0, alternative="greater").pvalue >= 0.05


def test_the_three_answers():
    assert judge_gain([25.5, 26.0, 29.4]).beyond is True and judge_gain([25.5, 26.0, 29.4]).seeds_needed is None
    assert judge_gain([0.2, -0.5, 0.9]).beyond is False  # not above the 1% floor on average
    assert judge_gain([-30.0, -10.0, -20.0]).beyond is False
    one = judge_gain([12.0])
    assert one.beyond is None and one.seeds_needed is None and math.isnan(one.p_value)
