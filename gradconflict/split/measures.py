"""Pure measures for judging a split: Delta-m% against a baseline, and how smoothly a loss curve falls.

>>> round(delta_m({"a": 0.9, "b": 0.5}, {"a": 1.0, "b": 0.4}, {"a": True, "b": False}), 3)
17.5
>>> smoothness([3.0, 2.0, 1.0, 0.5]).rise_share
0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Smoothness", "delta_m", "smoothed", "smoothness", "task_improvement"]


def task_improvement(value: float, base: float, lower_is_better: bool) -> float:
    """One task's signed relative change in percent, ``(-1)^l (M - B) / B * 100``: positive means better.

    >>> round(task_improvement(0.8, 1.0, lower_is_better=True), 6)
    20.0
    """
    if base == 0:
        raise ValueError("the baseline metric is 0: a relative improvement over it is undefined")
    sign = -1.0 if lower_is_better else 1.0
    return sign * (value - base) / base * 100.0


def delta_m(
    metrics: Mapping[str, float] | Sequence[float],
    baseline: Mapping[str, float] | Sequence[float],
    lower_is_better: Mapping[str, bool] | Sequence[bool] | bool,
) -> float:
    """Delta-m% (Maninis et al. 2019): the mean over tasks of :func:`task_improvement`.

    ``(100 / T) sum_t (-1)^{l_t} (M_t - B_t) / B_t`` with ``l_t = 1`` where lower is better. Positive: the
    model beats the baseline (usually independent single-task models) on average.

    Args:
        metrics: each task's metric ``M_t`` (a mapping task -> value, or a sequence in task order).
        baseline: each task's baseline ``B_t``, keyed or ordered like ``metrics``.
        lower_is_better: per task (mapping or sequence), or one bool for all tasks.

    >>> delta_m([1.0, 2.0], [2.0, 2.0], True)
    25.0
    """
    if isinstance(metrics, Mapping):
        if not isinstance(baseline, Mapping) or set(baseline) != set(metrics):
            raise ValueError("metrics and baseline must be mappings over the same tasks")
        keys = list(metrics)
        values, bases = [metrics[k] for k in keys], [baseline[k] for k in keys]
        lower = [lower_is_better if isinstance(lower_is_better, bool) else lower_is_better[k] for k in keys]
    else:
        values, bases = list(metrics), list(baseline)
        lower = [lower_is_better] * len(values) if isinstance(lower_is_better, bool) else list(lower_is_better)
    if not values or len(bases) != len(values) or len(lower) != len(values):
        raise ValueError("metrics, baseline and lower_is_better must cover the same, non-empty set of tasks")
    return sum(task_improvement(v, b, low) for v, b, low in zip(values, bases, lower)) / len(values)


@dataclass(frozen=True)
class Smoothness:
    """How a loss curve falls, measured on its exponential moving average.

    Attributes:
        rise_share: share of steps where the smoothed loss rises (0: it only falls).
        diff_variance: variance of the smoothed loss's step-to-step differences (back-and-forth shows here).
        steps: number of loss values measured.

    >>> Smoothness(rise_share=0.1, diff_variance=0.0, steps=50).rise_share
    0.1
    """

    rise_share: float
    diff_variance: float
    steps: int


def smoothed(losses: Sequence[float], span: int = 10) -> list[float]:
    """The exponential moving average of a loss curve (``alpha = 2 / (span + 1)``, started at the first value).

    Non-finite values are dropped first.

    >>> smoothed([1.0, float("nan"), 3.0], span=3)
    [1.0, 2.0]
    """
    if span < 1:
        raise ValueError(f"span must be at least 1, got {span}")
    alpha = 2.0 / (span + 1)
    ema: list[float] = []
    for v in (float(v) for v in losses):
        if math.isfinite(v):
            ema.append(v if not ema else ema[-1] + alpha * (v - ema[-1]))
    return ema


def smoothness(losses: Sequence[float], span: int = 10) -> Smoothness:
    """Measure a loss curve's smoothness on its moving average (:func:`smoothed`).

    Fewer than three finite values give ``nan`` measures.

    >>> s = smoothness([1.0, 2.0, 1.0, 2.0, 1.0], span=1)
    >>> s.rise_share, s.diff_variance
    (0.5, 1.0)
    """
    ema = smoothed(losses, span)
    if len(ema) < 3:
        return Smoothness(math.nan, math.nan, len(ema))
    diffs = [b - a for a, b in zip(ema, ema[1:])]
    mean = sum(diffs) / len(diffs)
    return Smoothness(
        rise_share=sum(d > 0 for d in diffs) / len(diffs),
        diff_variance=sum((d - mean) ** 2 for d in diffs) / len(diffs),
        steps=len(ema),
    )
