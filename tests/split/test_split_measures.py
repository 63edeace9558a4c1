from __future__ import annotations

import math

import pytest

from gradconflict.split import delta_m, smoothness


def test_delta_m_matches_hand_computation():
    # a: lower is better, 0.8 vs 1.0 -> +20%; b: higher is better, 0.45 vs 0.5 -> -10%; c: lower, 2.2 vs 2 -> -10%
    value = delta_m({"a": 0.8, "b": 0.45, "c": 2.2}, {"a": 1.0, "b": 0.5, "c": 2.0}, {"a": True, "b": False, "c": True})
    assert value == pytest.approx((20.0 - 10.0 - 10.0) / 3)
    assert delta_m([0.9, 0.6], [1.0, 0.5], [True, False]) == pytest.approx((10.0 + 20.0) / 2)
    assert delta_m([1.0], [1.0], True) == 0.0


def test_delta_m_rejects_mismatches_and_zero_baseline():
    with pytest.raises(ValueError):
        delta_m({"a": 1.0}, {"b": 1.0}, True)
    with pytest.raises(ValueError):
        delta_m([1.0, 2.0], [1.0], True)
    with pytest.raises(ValueError, match="baseline metric is 0"):
        delta_m([1.0], [0.0], True)


def test_smoothness_counts_rises_of_the_smoothed_curve():
    assert smoothness([4.0, 3.0, 2.0, 1.0]).rise_share == 0.0
    zigzag = smoothness([1.0, 2.0] * 10, span=1)
    assert zigzag.rise_share == pytest.approx(10 / 19)
    assert zigzag.diff_variance > 0
    assert math.isnan(smoothness([1.0, float("nan"), 2.0]).rise_share)  # two finite values are too few
    with pytest.raises(ValueError):
        smoothness([1.0, 2.0, 3.0], span=0)
