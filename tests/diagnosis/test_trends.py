import math

import numpy as np
import pytest

from gradconflict import ConflictReport, History
from gradconflict.diagnosis import ema, series, summarize, trend, window_means
from gradconflict.diagnosis.trends import measured_reports, quantities


def test_series_skips_skipped_steps_and_sorts_by_step(make_report, make_pair):
    h = History()
    h.append(make_report(make_pair(0.5), step=2))
    h.append(ConflictReport.skipped_step("ab", step=3, reason="nan"))
    h.append(make_report(make_pair(-0.5), step=1))
    steps, values = series(h, "worst_cosine")
    assert steps.tolist() == [1, 2]
    assert values == pytest.approx([-0.5, 0.5])
    assert len(measured_reports(h)) == 2


def test_series_quantities(make_report, make_pair):
    r = make_report(make_pair(-0.2, norms=(1.0, 3.0)))
    assert quantities(r.tasks)[-2:] == ["alignment/a", "alignment/b"]
    assert series([r], "conflict_fraction")[1].tolist() == [1.0]
    assert series([r], "conflict_fraction", threshold=-0.5)[1].tolist() == [0.0]
    assert series([r], "cancellation")[1][0] == pytest.approx(float(r.cancellation))
    assert series([r], "alignment/b")[1][0] == pytest.approx(float(r.alignment[1]))
    with pytest.raises(ValueError, match="unknown quantity"):
        series([r], "alignment/z")


def test_ema_decays_per_training_step_not_per_report():
    dense_steps = np.arange(0, 20)
    values = np.where(dense_steps < 11, 0.0, 1.0)  # constant over each pair of steps (2k-1, 2k)
    dense = ema(dense_steps, values, decay=0.8)
    sparse = ema(dense_steps[::2], values[::2], decay=0.8)  # what every=2 sampling sees
    assert sparse == pytest.approx(dense[::2], abs=1e-12)
    per_report = ema(np.arange(10), values[::2], decay=0.8)  # the naive per-report EMA would lag less
    assert not np.allclose(per_report, sparse)
    with pytest.raises(ValueError):
        ema(dense_steps, values, decay=1.0)


def test_window_means_span_steps():
    steps = np.array([0, 1, 5, 6, 7])
    out = window_means(steps, np.array([1.0, 1.0, 3.0, 3.0, 6.0]), width=3)
    assert out.tolist() == [1.0, 1.0, 3.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        window_means(steps, steps.astype(float), width=0)


def test_trend_detects_rise_fall_and_noise():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 200, 4)
    rising = trend(steps, 0.002 * steps + rng.normal(0, 0.05, len(steps)))
    assert rising.rising(0.05) and not rising.falling(0.05)
    assert rising.low <= rising.slope <= rising.high
    assert rising.slope == pytest.approx(0.002, rel=0.25)
    falling = trend(steps, -0.002 * steps + rng.normal(0, 0.05, len(steps)))
    assert falling.falling(0.05)
    noise = trend(steps, rng.normal(0, 1, len(steps)))
    assert not noise.rising(0.05) and not noise.falling(0.05)
    assert trend(np.arange(2), np.array([0.0, 1.0])).p_value == 1.0


def test_trend_is_invariant_to_sampling_rate():
    rng = np.random.default_rng(1)
    steps = np.arange(400)
    values = 0.001 * steps + rng.normal(0, 0.02, 400)
    assert trend(steps[::4], values[::4]).slope == pytest.approx(trend(steps, values).slope, rel=0.1)


def test_summarize(make_report, make_pair):
    reports = [make_report(make_pair(c), step=s) for s, c in enumerate(np.linspace(0.9, -0.9, 40))]
    out = summarize(reports, width=10)
    assert set(out) == set(quantities("ab"))
    cf = out["conflict_fraction"]
    assert cf.first_window == 0.0 and cf.last_window == 1.0 and cf.mean == pytest.approx(0.5)
    assert cf.trend.rising(0.05) and out["worst_cosine"].trend.falling(0.05)
    assert summarize([]) == {}
    assert summarize([ConflictReport.skipped_step("ab", 0, "nan")]) == {}


def test_trend_ignores_rounding_noise_on_a_constant_series():
    values = np.ones(50) + np.where(np.arange(50) > 25, 2e-16, 0.0)
    assert trend(np.arange(50), values).p_value == 1.0


def test_series_hold_only_the_steps_where_a_quantity_is_defined(make_cut, make_gram):
    # Steps 0-5: b and a (cosine -0.5); step 6: a alone; steps 7-9: c and a (cosine +0.5).
    run = []
    for s in range(10):
        G = make_gram([[1.0, -0.5, 0.5], [-0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])
        names = "ba" if s < 6 else "a" if s == 6 else "ca"
        run.append(make_cut(names, G, step=s, tasks="abc"))
    steps, values = series(run, "conflict_fraction")
    assert steps.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9] and values.tolist() == [1.0] * 6 + [0.0] * 3
    steps, values = series(run, "worst_cosine")
    assert values == pytest.approx([-0.5] * 6 + [0.5] * 3)
    assert series(run, "alignment/b")[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert series(run, "alignment/c")[0].tolist() == [7, 8, 9]
    # Unit norms at cosine c: |g_1 + g_2| = sqrt(2 + 2c), cancellation 1 - sqrt(2 + 2c) / 2.
    assert series(run, "cancellation")[1] == pytest.approx([1 - 0.5] * 6 + [1 - math.sqrt(3) / 2] * 3)
    out = summarize(run, width=4)
    assert list(out) == quantities("abc")
    assert out["conflict_fraction"].mean == pytest.approx(6 / 9) and out["alignment/c"].trend.n == 3
    lonely = [make_cut("a" if s % 2 else "b", make_gram([[1.0, 0.0], [0.0, 1.0]]), step=s, tasks="ab")
              for s in range(4)]
    assert summarize(lonely) == {} and len(series(lonely, "conflict_fraction")[0]) == 0


@pytest.mark.parametrize("ties", [False, True])
def test_theil_sen_equals_scipy(ties):
    from scipy import stats

    from gradconflict.diagnosis.trends import theil_sen

    rng = np.random.default_rng(3)
    x = np.sort(rng.integers(0, 60, 150)).astype(float) if ties else np.arange(150.0) * 3
    y = rng.integers(0, 4, 150) / 3 if ties else 0.01 * x + rng.normal(0, 1, 150)
    expected = stats.theilslopes(y, x)
    assert theil_sen(x, y) == (expected.slope, expected.low_slope, expected.high_slope)
    assert theil_sen(x[::-1], y[::-1]) == theil_sen(x, y)  # the order of the points does not matter


def test_a_long_series_is_fitted_on_bin_means_with_statistics_of_those_means():
    from scipy import stats

    from gradconflict.diagnosis.trends import TREND_POINTS

    rng = np.random.default_rng(5)
    n = 5 * TREND_POINTS + 7
    steps = np.sort(rng.choice(20 * n, n, replace=False))  # sparse, uneven sampling
    values = 1e-5 * steps + rng.normal(0, 1, n)
    # The reference: bin k holds the points k n // B to (k + 1) n // B - 1, averaged by a plain loop.
    edges = [k * n // TREND_POINTS for k in range(TREND_POINTS + 1)]
    x = np.array([sum(steps[a:b]) / (b - a) for a, b in zip(edges, edges[1:])])
    y = np.array([sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])])
    fit, test = stats.theilslopes(y, x), stats.kendalltau(x, y)
    t = trend(steps, values)
    assert (t.n, t.steps) == (TREND_POINTS, n)
    assert t.slope == pytest.approx(fit.slope, rel=1e-12)
    assert (t.low, t.high) == pytest.approx((fit.low_slope, fit.high_slope), rel=1e-12)
    assert (t.tau, t.p_value) == pytest.approx((test.statistic, test.pvalue), rel=1e-9)
    short = trend(steps[:TREND_POINTS], values[:TREND_POINTS])  # up to TREND_POINTS: every point as it is
    assert (short.n, short.steps) == (TREND_POINTS, TREND_POINTS)
    assert short.slope == stats.theilslopes(values[:TREND_POINTS], steps[:TREND_POINTS]).slope


def test_a_flat_noisy_long_series_shows_no_trend():
    rng = np.random.default_rng(0)
    steps = np.arange(200_000)
    t = trend(steps, rng.normal(0, 1, steps.size))
    assert t.n == 2048 and t.p_value > 0.05 and t.low < 0 < t.high
