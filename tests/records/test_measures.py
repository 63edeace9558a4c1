from __future__ import annotations

import math

import pytest

from gradconflict.records.measures import relative_improvement, task_improvement
from gradconflict.split import delta_m, smoothness

# NYUv2, 9 metrics over 3 tasks, from Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022), Table 2:
# single-task learning (STL, the baseline), linear scalarisation (LS) and Nash-MTL, with the Delta-m% the paper
# prints (its sign: lower is better, so ours, positive when better, is the opposite).
NYU_DIRECTIONS = {
    "segmentation": {"miou": "max", "pix_acc": "max"},
    "depth": {"abs_err": "min", "rel_err": "min"},
    "normal": {"mean": "min", "median": "min", "within_11.25": "max", "within_22.5": "max", "within_30": "max"},
}


def _nyu(miou, pix, abs_err, rel_err, mean, median, a11, a22, a30):
    return {
        "segmentation": {"miou": miou, "pix_acc": pix},
        "depth": {"abs_err": abs_err, "rel_err": rel_err},
        "normal": {"mean": mean, "median": median, "within_11.25": a11, "within_22.5": a22, "within_30": a30},
    }


STL = _nyu(38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15)
LS = _nyu(39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08)
NASH_MTL = _nyu(40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15)


def test_delta_m_gives_the_papers_numbers_on_nyuv2():
    # The table's metrics are rounded, so the last digit may differ by one.
    assert delta_m(LS, STL, NYU_DIRECTIONS) == pytest.approx(-5.59, abs=0.01)
    assert delta_m(NASH_MTL, STL, NYU_DIRECTIONS) == pytest.approx(4.04, abs=0.015)


def test_per_task_averaging_is_libmtls_count_improvement():
    # LibMTL's count_improvement docstring example: base {'A': [96, 98], 'B': [0.2]}, new {'A': [93, 99], 'B': [0.5]},
    # weight {'A': [1, 0], 'B': [1]} (1: higher is better). By hand: A = ((93 - 96) / 96 - (99 - 98) / 98) / 2,
    # B = (0.5 - 0.2) / 0.2, Delta_p = (A + B) / 2 = 73.96%; averaged per metric instead: 48.62%.
    new, base = {"A": {"m1": 93.0, "m2": 99.0}, "B": {"m": 0.5}}, {"A": {"m1": 96.0, "m2": 98.0}, "B": {"m": 0.2}}
    directions = {"A": {"m1": "max", "m2": "min"}, "B": "max"}
    a = ((93 - 96) / 96 - (99 - 98) / 98) / 2 * 100
    assert delta_m(new, base, directions, average="task") == pytest.approx((a + 150.0) / 2)
    assert delta_m(new, base, directions, average="task") == pytest.approx(73.96, abs=0.005)
    assert delta_m(new, base, directions) == pytest.approx((-3.125 - 100 / 98 + 150.0) / 3)
    assert task_improvement(new, base, directions, "A") == pytest.approx(a)


def test_delta_m_one_metric_per_task_and_one_direction_for_all():
    # a: lower is better, 0.8 vs 1.0 -> +20%; b: higher is better, 0.45 vs 0.5 -> -10%; c: lower, 2.2 vs 2 -> -10%
    directions = {"a": "min", "b": "max", "c": "min"}
    value = delta_m({"a": 0.8, "b": 0.45, "c": 2.2}, {"a": 1.0, "b": 0.5, "c": 2.0}, directions)
    assert value == pytest.approx((20.0 - 10.0 - 10.0) / 3)
    assert delta_m({"a": 0.9, "b": 0.6}, {"a": 1.0, "b": 0.5}, "min") == pytest.approx((10.0 - 20.0) / 2)
    assert delta_m({"a": 1.0}, {"a": 1.0}, "max") == 0.0


def test_a_negative_baseline_is_divided_by_its_absolute_value():
    # A log-likelihood (higher is better) of -1.5 against a baseline of -1.0 is worse: -50%, not +50%.
    assert relative_improvement(-1.5, -1.0, "max") == pytest.approx(-50.0)
    assert relative_improvement(-0.5, -1.0, "max") == pytest.approx(50.0)
    assert relative_improvement(-1.5, -1.0, "min") == pytest.approx(50.0)


def test_delta_m_rejects_mismatches_zero_baseline_and_bad_directions():
    with pytest.raises(ValueError, match="same"):
        delta_m({"a": 1.0}, {"b": 1.0}, "min")
    with pytest.raises(ValueError, match="same"):
        delta_m({"a": {"x": 1.0}}, {"a": {"y": 1.0}}, "min")
    with pytest.raises(ValueError, match="baseline metric is 0"):
        delta_m({"a": 1.0}, {"a": 0.0}, "min")
    with pytest.raises(ValueError, match="'max' \\(higher is better\\) or 'min'"):
        delta_m({"a": 1.0}, {"a": 2.0}, "lower")
    with pytest.raises(ValueError, match="no direction for task 'b'"):
        delta_m({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 2.0}, {"a": "min"})
    with pytest.raises(ValueError, match="average"):
        delta_m({"a": 1.0}, {"a": 2.0}, "min", average="tasks")  # type: ignore[arg-type]


def test_smoothness_counts_rises_of_the_smoothed_curve():
    assert smoothness([4.0, 3.0, 2.0, 1.0]).rise_share == 0.0
    zigzag = smoothness([1.0, 2.0] * 10, span=1)
    assert zigzag.rise_share == pytest.approx(10 / 19)
    assert zigzag.diff_variance > 0
    assert math.isnan(smoothness([1.0, float("nan"), 2.0]).rise_share)  # two finite values are too few
    with pytest.raises(ValueError):
        smoothness([1.0, 2.0, 3.0], span=0)
