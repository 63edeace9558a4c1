"""Time aggregation of a run's reports: series, EMA, sliding windows and a trend test.

Everything is indexed by the training step of each report, not by its position in the history, so sampling
with ``every=k`` and skipped steps only make the series sparser: an EMA decays per training step, a window
spans a number of training steps, and the trend is a slope per training step.

The trend of a long series is fitted on the means of :data:`TREND_POINTS` bins of consecutive measured steps (equal
counts), not on every step: Theil-Sen takes every pair of points, ``n (n - 1) / 2`` slopes (37 GiB for 100,000
steps). Its slope, confidence interval and Mann-Kendall p-value are all those of the bin means, with ``n`` the number
of means the fit used (:attr:`Trend.n`; :attr:`Trend.steps` the steps behind them). A bin mean over neighbouring
steps also averages out most of their autocorrelation, which the test (as Mann-Kendall does) assumes absent.

Tasks are tracked by name (the sorted union of the task names, see :mod:`~gradconflict.diagnosis.aligned`), and a
quantity's series only holds the steps where it is defined: pair quantities (conflict fraction, cancellation,
worst cosine, alignment) need a step that carried two tasks or more, and ``alignment/<task>`` a step that
carried that task. Steps with fewer tasks (partial labels, round-robin training) thin the series instead of
adding values nobody measured.

>>> import torch
>>> from gradconflict import ConflictReport
>>> reports = [ConflictReport(("a", "b"), torch.tensor([[1.0, c], [c, 1.0]]), step=4 * s)
...            for s, c in enumerate([0.5, 0.2, -0.1, -0.4, -0.7])]
>>> steps, values = series(reports, "worst_cosine")
>>> steps.tolist()
[0, 4, 8, 12, 16]
>>> t = trend(steps, -values)           # is conflict (minus the worst cosine) rising?
>>> round(t.slope, 3), t.rising(0.05)
(0.075, True)
>>> one = ConflictReport(("a",), torch.ones(1, 1), step=20)     # a step with one task: no pair, no value
>>> series([*reports, one], "worst_cosine")[0].tolist()
[0, 4, 8, 12, 16]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from gradconflict.diagnosis.aligned import Aligned, Reports, Run, align, measured_reports
from gradconflict.measure.metrics import CONFLICT_COSINE
from gradconflict.records.history import EMA_DECAY

__all__ = [
    "QuantitySummary",
    "Reports",
    "Run",
    "TREND_POINTS",
    "Trend",
    "binned",
    "ema",
    "measured_reports",
    "quantities",
    "series",
    "summarize",
    "theil_sen",
    "trend",
    "window_means",
]


#: The most points a trend is fitted on (Theil-Sen's slopes: 2 million, 16 MB); a longer series is binned.
TREND_POINTS = 2048


def quantities(tasks: Sequence[str]) -> list[str]:
    """Names :func:`series` understands for these tasks.

    >>> quantities(["a", "b"])
    ['conflict_fraction', 'cancellation', 'worst_cosine', 'alignment/a', 'alignment/b']
    """
    return ["conflict_fraction", "cancellation", "worst_cosine", *(f"alignment/{t}" for t in tasks)]


def _values(aligned: Aligned, quantity: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(defined, values)``: where the quantity is defined, and its value on every step (NaN elsewhere)."""
    if quantity == "conflict_fraction":
        return aligned.multi, aligned.conflict_fraction(threshold)
    if quantity == "cancellation":
        return aligned.multi, aligned.cancellation
    if quantity == "worst_cosine":
        return aligned.multi, aligned.worst_cosine
    task = quantity[len("alignment/") :]
    if quantity.startswith("alignment/") and task in aligned.tasks:
        k = aligned.index(task)
        return aligned.multi & aligned.present[:, k], aligned.alignment[:, k]
    raise ValueError(f"unknown quantity {quantity!r}; known: {quantities(aligned.tasks)}")


def series(history: Run, quantity: str, threshold: float = CONFLICT_COSINE) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one quantity over the measured steps where it is defined (see :func:`quantities`
    for the names and the module docstring for where each is defined).

    ``threshold`` is the conflict cosine ``S`` used by ``"conflict_fraction"``.
    """
    aligned = align(history)
    defined, values = _values(aligned, quantity, threshold)
    return aligned.steps[defined], values[defined].astype(np.float64)


def ema(steps: np.ndarray, values: np.ndarray, decay: float = EMA_DECAY) -> np.ndarray:
    """Exponential moving average with ``decay`` per *training step*: a gap of ``k`` steps decays by
    ``decay**k``, so ``every=k`` sampling and skipped steps do not change the averaging horizon.

    >>> ema(np.array([0, 1, 3]), np.array([1.0, 0.0, 0.0]), decay=0.5).tolist()
    [1.0, 0.5, 0.125]
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    out = np.empty(len(values), dtype=np.float64)
    for k, value in enumerate(values):
        keep = decay ** float(steps[k] - steps[k - 1]) if k else 0.0
        out[k] = keep * out[k - 1] + (1 - keep) * value if k else value
    return out


def window_means(steps: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    """Sliding-window mean: for each report, the mean of the values whose step lies in ``(step - width, step]``.

    >>> window_means(np.array([0, 2, 4, 6]), np.array([1.0, 2.0, 3.0, 4.0]), width=4).tolist()
    [1.0, 1.5, 2.5, 3.5]
    """
    if width < 1:
        raise ValueError(f"width must be a positive number of steps, got {width}")
    starts = np.searchsorted(steps, steps - width, side="right")
    csum = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    return (csum[ends] - csum[starts]) / (ends - starts)


@dataclass(frozen=True)
class Trend:
    """A robust trend of a quantity over training steps.

    Attributes:
        slope: Theil-Sen slope (change per training step).
        low: lower bound of the slope's 95% confidence interval.
        high: upper bound of the slope's 95% confidence interval.
        tau: Kendall's tau between step and value (the Mann-Kendall statistic, normalised).
        p_value: two-sided p-value of the Mann-Kendall test of no monotonic trend.
        n: number of points the slope and the test used: the measured steps, or the :func:`binned` means of a
            series longer than :data:`TREND_POINTS`.
        steps: number of measured steps behind those points (``n`` unless binned).
    """

    slope: float
    low: float
    high: float
    tau: float
    p_value: float
    n: int
    steps: int = 0

    def rising(self, alpha: float) -> bool:
        """True when the quantity increases significantly (``tau > 0`` and ``p_value < alpha``)."""
        return self.tau > 0 and self.p_value < alpha

    def falling(self, alpha: float) -> bool:
        """True when the quantity decreases significantly."""
        return self.tau < 0 and self.p_value < alpha


def theil_sen(x: np.ndarray, y: np.ndarray, alpha: float = 0.95) -> tuple[float, float, float]:
    """``(slope, low, high)``: the Theil-Sen slope (median of the pairwise slopes) and its ``alpha`` confidence
    interval (Sen, 1968), exactly as ``scipy.stats.theilslopes(y, x, alpha)``.

    The same order statistics, selected with ``np.partition`` instead of a full sort of the ``n (n - 1) / 2``
    slopes, and the slopes computed one offset ``k`` at a time (``x`` sorted: every pair ``(i, i + k)``) straight
    into one array, without ``n x n`` temporaries.

    >>> theil_sen(np.arange(6.0), np.array([0.0, 2.0, 4.0, 6.0, 8.0, 100.0]))[0]
    2.0
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    n = len(x)
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    slopes = np.empty(n * (n - 1) // 2)
    start = 0
    with np.errstate(divide="ignore", invalid="ignore"):  # tied x: dropped below
        for k in range(1, n):
            np.divide(np.subtract(ys[k:], ys[:-k]), np.subtract(xs[k:], xs[:-k]), out=slopes[start : start + n - k])
            start += n - k
    if n > 1 and bool((xs[1:] == xs[:-1]).any()):  # tied x: only the pairs with x_i < x_j count
        gaps = np.concatenate([xs[k:] - xs[:-k] for k in range(1, n)])
        slopes = slopes[gaps > 0]
    nt = len(slopes)
    if not nt:
        return float("nan"), float("nan"), float("nan")
    alpha = 1.0 - alpha if alpha > 0.5 else alpha
    z = float(stats.norm.ppf(alpha / 2.0))

    def ties(a: np.ndarray) -> float:
        counts = np.unique(a, return_counts=True)[1].astype(np.float64)
        counts = counts[counts > 1]
        return float((counts * (counts - 1) * (2 * counts + 5)).sum())

    sigsq = (n * (n - 1) * (2 * n + 5) - ties(x) - ties(y)) / 18.0
    mid = [nt // 2] if nt % 2 else [nt // 2 - 1, nt // 2]
    bounds: list[int] = []
    if sigsq >= 0 and np.isfinite(sigsq):
        sigma = float(np.sqrt(sigsq))
        bounds = [max(int(np.round((nt + z * sigma) / 2.0)) - 1, 0), min(int(np.round((nt - z * sigma) / 2.0)), nt - 1)]
    if bounds and not all(0 <= b < nt for b in bounds):
        bounds = []
    slopes.partition(sorted(set(mid + bounds)))  # in place: the slopes are ours
    slope = float(slopes[mid].mean())
    low, high = (float(slopes[bounds[0]]), float(slopes[bounds[1]])) if bounds else (float("nan"), float("nan"))
    return slope, low, high


def binned(steps: np.ndarray, values: np.ndarray, bins: int = TREND_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """``(mean step, mean value)`` of ``bins`` runs of consecutive points of (nearly) equal count, in order; the
    points as they are when there are ``bins`` or fewer. Bin ``k`` holds the points ``k n // bins`` to
    ``(k + 1) n // bins - 1``.

    >>> binned(np.arange(6), np.array([0.0, 2.0, 4.0, 6.0, 8.0, 10.0]), bins=3)
    (array([0.5, 2.5, 4.5]), array([1., 5., 9.]))
    """
    n = len(values)
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if n <= bins:
        return x, y
    starts = np.arange(bins) * n // bins
    counts = np.diff(np.append(starts, n))
    return np.add.reduceat(x, starts) / counts, np.add.reduceat(y, starts) / counts


def trend(steps: np.ndarray, values: np.ndarray) -> Trend:
    """Theil-Sen slope (:func:`theil_sen`, as ``scipy.stats.theilslopes``) and Mann-Kendall test
    (``scipy.stats.kendalltau``), on the points as they are up to :data:`TREND_POINTS` of them, on the means of
    that many bins of consecutive points (:func:`binned`) beyond: slope, interval and p-value are all the fit's
    on the same points.

    Fewer than three points, or a series constant up to floating-point rounding (``np.allclose``), give a flat
    trend with ``p_value = 1``.

    >>> trend(np.arange(5), np.ones(5)).p_value
    1.0
    >>> t = trend(np.arange(100_000), np.linspace(0.0, 1.0, 100_000))      # 2048 means of about 49 steps each
    >>> t.n, t.steps, round(t.slope * 100_000, 3), t.rising(0.05)
    (2048, 100000, 1.0, True)
    """
    n = len(values)
    if n < 3 or np.allclose(values, values[0]):
        return Trend(0.0, 0.0, 0.0, 0.0, 1.0, n, n)
    x, y = binned(steps, values)
    slope, low, high = theil_sen(x, y)
    tau, p = stats.kendalltau(x, y)
    return Trend(float(slope), float(low), float(high), float(tau), float(p), len(y), n)


@dataclass(frozen=True)
class QuantitySummary:
    """One quantity over a run.

    Attributes:
        name: the quantity (see :func:`quantities`).
        mean: mean over the measured steps where the quantity is defined.
        ema: the last value of the per-step EMA.
        first_window: mean over the first window of ``width`` steps.
        last_window: mean over the last window of ``width`` steps.
        trend: Theil-Sen slope and Mann-Kendall test.
    """

    name: str
    mean: float
    ema: float
    first_window: float
    last_window: float
    trend: Trend


def summarize(
    history: Run, *, decay: float = EMA_DECAY, width: int | None = None, threshold: float = CONFLICT_COSINE
) -> dict[str, QuantitySummary]:
    """A :class:`QuantitySummary` of each quantity of :func:`quantities` (tasks in sorted order), each over the
    steps where it is defined; a quantity defined on no step is left out (so the result is empty for a history
    with no measured step, and holds no pair quantity for a run whose steps each carried a single task).
    ``width`` defaults to a quarter of the measured span of steps (at least one step); each quantity's windows
    start at its own first and end at its own last step."""
    aligned = align(history)
    if not aligned.num_steps:
        return {}
    w = width if width is not None else max(1, int(aligned.steps[-1] - aligned.steps[0] + 1) // 4)
    out = {}
    for name in quantities(aligned.tasks):
        steps, values = series(aligned, name, threshold)
        if not len(values):
            continue
        first = values[steps < steps[0] + w]
        out[name] = QuantitySummary(
            name=name,
            mean=float(values.mean()),
            ema=float(ema(steps, values, decay)[-1]),
            first_window=float(first.mean()),
            last_window=float(window_means(steps, values, w)[-1]),
            trend=trend(steps, values),
        )
    return out
