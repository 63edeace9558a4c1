"""Time aggregation of a run's reports: series, EMA, sliding windows and a trend test.

Everything is indexed by the training step of each report, not by its position in the history, so sampling
with ``every=k`` and skipped steps only make the series sparser: an EMA decays per training step, a window
spans a number of training steps, and the trend is a slope per training step.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from gradconflict import metrics
from gradconflict.history import History, worst_cosine
from gradconflict.report import ConflictReport

__all__ = [
    "QuantitySummary",
    "Trend",
    "ema",
    "measured_reports",
    "quantities",
    "series",
    "summarize",
    "trend",
    "window_means",
]

Reports = History | Iterable[ConflictReport]


def measured_reports(history: Reports) -> list[ConflictReport]:
    """The measured (not skipped) reports of a history or of any iterable of reports, in step order."""
    reports = history.reports if isinstance(history, History) else list(history)
    return sorted((r for r in reports if not r.skipped), key=lambda r: r.step)


def quantities(tasks: Sequence[str]) -> list[str]:
    """Names :func:`series` understands for these tasks.

    >>> quantities(["a", "b"])
    ['conflict_fraction', 'cancellation', 'worst_cosine', 'alignment/a', 'alignment/b']
    """
    return ["conflict_fraction", "cancellation", "worst_cosine", *(f"alignment/{t}" for t in tasks)]


def _value(report: ConflictReport, quantity: str, threshold: float) -> float:
    if quantity == "conflict_fraction":
        return float(metrics.conflict_fraction(report.gram, threshold))
    if quantity == "cancellation":
        return float(report.cancellation)
    if quantity == "worst_cosine":
        return float(worst_cosine(report))
    if quantity.startswith("alignment/") and quantity[len("alignment/") :] in report.tasks:
        return float(report.alignment[report.tasks.index(quantity[len("alignment/") :])])
    raise ValueError(f"unknown quantity {quantity!r}; known: {quantities(report.tasks)}")


def series(history: Reports, quantity: str, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one quantity over the measured steps (see :func:`quantities` for the names).

    ``threshold`` is the conflict cosine ``S`` used by ``"conflict_fraction"``.
    """
    reports = measured_reports(history)
    steps = np.array([r.step for r in reports], dtype=np.int64)
    return steps, np.array([_value(r, quantity, threshold) for r in reports], dtype=np.float64)


def ema(steps: np.ndarray, values: np.ndarray, decay: float = 0.9) -> np.ndarray:
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
        n: number of points.
    """

    slope: float
    low: float
    high: float
    tau: float
    p_value: float
    n: int

    def rising(self, alpha: float) -> bool:
        """True when the quantity increases significantly (``tau > 0`` and ``p_value < alpha``)."""
        return self.tau > 0 and self.p_value < alpha

    def falling(self, alpha: float) -> bool:
        """True when the quantity decreases significantly."""
        return self.tau < 0 and self.p_value < alpha


def trend(steps: np.ndarray, values: np.ndarray) -> Trend:
    """Theil-Sen slope (``scipy.stats.theilslopes``) and Mann-Kendall test (``scipy.stats.kendalltau``).

    Fewer than three points, or a series constant up to floating-point rounding (``np.allclose``), give a flat
    trend with ``p_value = 1``.

    >>> trend(np.arange(5), np.ones(5)).p_value
    1.0
    """
    n = len(values)
    if n < 3 or np.allclose(values, values[0]):
        return Trend(0.0, 0.0, 0.0, 0.0, 1.0, n)
    slope, _, low, high = stats.theilslopes(values, steps)
    tau, p = stats.kendalltau(steps, values)
    return Trend(float(slope), float(low), float(high), float(tau), float(p), n)


@dataclass(frozen=True)
class QuantitySummary:
    """One quantity over a run.

    Attributes:
        name: the quantity (see :func:`quantities`).
        mean: mean over the measured steps.
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
    history: Reports, *, decay: float = 0.9, width: int | None = None, threshold: float = 0.0
) -> dict[str, QuantitySummary]:
    """A :class:`QuantitySummary` of each quantity of :func:`quantities` (empty for a history with no measured
    step). ``width`` defaults to a quarter of the measured span of steps (at least one step)."""
    reports = measured_reports(history)
    if not reports:
        return {}
    out = {}
    for name in quantities(reports[0].tasks):
        steps, values = series(reports, name, threshold)
        w = width if width is not None else max(1, int(steps[-1] - steps[0] + 1) // 4)
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
