"""Pure measures for judging a split: Delta-m% against a baseline, and how smoothly a loss curve falls.

One convention for the direction of a metric across the library: ``"max"`` (higher is better: accuracy, mIoU)
or ``"min"`` (lower is better: a loss, an error). Every improvement it reports is signed so that **positive means
better** than the baseline (as LibMTL's ``count_improvement``; Nash-MTL and others print the opposite sign, where
lower is better).

>>> round(delta_m({"a": 0.9, "b": 0.5}, {"a": 1.0, "b": 0.4}, {"a": "max", "b": "min"}), 3)
-17.5
>>> smoothness([3.0, 2.0, 1.0, 0.5]).rise_share
0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DIRECTIONS",
    "Direction",
    "Smoothness",
    "check_direction",
    "delta_m",
    "nested",
    "nested_directions",
    "relative_improvement",
    "smoothed",
    "smoothness",
    "task_improvement",
]

Direction = Literal["max", "min"]
#: The two directions a metric can improve in: ``"max"`` (higher is better) and ``"min"`` (lower is better).
DIRECTIONS: tuple[Direction, ...] = ("max", "min")

#: ``{task: value}`` (one metric per task, named after the task) or ``{task: {metric: value}}``.
Metrics = Mapping[str, float] | Mapping[str, Mapping[str, float]]
#: One direction for every metric, one per task, or one per task and metric.
Directions = str | Mapping[str, str] | Mapping[str, Mapping[str, str]]


def check_direction(direction: str, what: str = "a metric") -> Direction:
    """``direction`` if it is ``"max"`` or ``"min"``, else a ``ValueError`` naming ``what``.

    >>> check_direction("min")
    'min'
    """
    if direction not in DIRECTIONS:
        raise ValueError(
            f"the direction of {what} must be 'max' (higher is better) or 'min' (lower is better), got {direction!r}"
        )
    return direction


def nested(values: Metrics) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from either form of :data:`Metrics` (a bare value is the task's one metric,
    named after the task).

    >>> nested({"seg": 0.4, "depth": {"abs": 0.6, "rel": 0.2}})
    {'seg': {'seg': 0.4}, 'depth': {'abs': 0.6, 'rel': 0.2}}
    """
    return {
        t: {k: float(x) for k, x in v.items()} if isinstance(v, Mapping) else {t: float(v)} for t, v in values.items()
    }


def nested_directions(
    directions: Directions, like: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, Direction]]:
    """The direction of every metric of ``like`` (``{task: {metric: value}}``) from one direction for all, one per
    task, or one per task and metric; ``ValueError`` for a missing or unknown one.

    >>> nested_directions({"depth": "min", "seg": {"miou": "max"}}, {"depth": {"abs": 0.6}, "seg": {"miou": 0.4}})
    {'depth': {'abs': 'min'}, 'seg': {'miou': 'max'}}
    """
    out: dict[str, dict[str, Direction]] = {}
    for task, metrics in like.items():
        given = directions if isinstance(directions, str) else directions.get(task)
        if given is None:
            raise ValueError(f"no direction for task {task!r}: give 'max' or 'min' for each task (or each metric)")
        out[task] = {}
        for metric in metrics:
            d = given if isinstance(given, str) else given.get(metric)
            if d is None:
                raise ValueError(f"no direction for metric {metric!r} of task {task!r}: give 'max' or 'min'")
            out[task][metric] = check_direction(d, f"metric {metric!r} of task {task!r}")
    return out


def relative_improvement(value: float, base: float, direction: str) -> float:
    """One metric's signed relative change in percent, ``+-(M - B) / |B| * 100``: positive means better, with
    ``+`` for ``"max"`` and ``-`` for ``"min"``. The absolute value of the baseline keeps the sign meaningful
    for a negative baseline (a log-likelihood, a score below zero).

    >>> round(relative_improvement(0.8, 1.0, "min"), 6), round(relative_improvement(-1.5, -1.0, "max"), 6)
    (20.0, -50.0)
    """
    if base == 0:
        raise ValueError("the baseline metric is 0: a relative improvement over it is undefined")
    sign = 1.0 if check_direction(direction) == "max" else -1.0
    return sign * (value - base) / abs(base) * 100.0


def task_improvement(metrics: Metrics, baseline: Metrics, directions: Directions, task: str) -> float:
    """One task's improvement over ``baseline`` in percent: the mean of :func:`relative_improvement` over the
    task's metrics (positive: better).

    >>> new, base = {"seg": {"miou": 40.0, "acc": 66.0}}, {"seg": {"miou": 38.0, "acc": 64.0}}
    >>> round(task_improvement(new, base, "max", "seg"), 3)     # (2 / 38 + 2 / 64) / 2
    4.194
    """
    values, bases = nested(metrics), nested(baseline)
    signs = nested_directions(directions, {task: values[task]})
    terms = [relative_improvement(v, bases[task][k], signs[task][k]) for k, v in values[task].items()]
    return sum(terms) / len(terms)


def delta_m(
    metrics: Metrics,
    baseline: Metrics,
    directions: Directions,
    *,
    average: Literal["metric", "task"] = "metric",
) -> float:
    """Delta-m% (Maninis et al., CVPR 2019), positive when ``metrics`` beat ``baseline`` on average.

    ``average="metric"``: the mean over every metric of every task of :func:`relative_improvement`,
    ``(100 / K) sum_k +-(M_k - B_k) / |B_k|`` (Maninis et al.; Nash-MTL's and most papers' tables, with the
    opposite sign). ``average="task"``: first the mean over each task's metrics, then over tasks, so that a task
    with many metrics does not outweigh the others (LibMTL's ``count_improvement``; Recon).

    Args:
        metrics: each task's metrics, ``{task: value}`` or ``{task: {metric: value}}``.
        baseline: the baseline's (usually single-task models), in the same form and with the same keys.
        directions: ``"max"`` or ``"min"`` for all, per task (``{task: "min"}``) or per metric.
        average: ``"metric"`` or ``"task"``.

    >>> m = {"seg": {"miou": 40.0, "acc": 66.0}, "depth": {"abs": 0.5}}
    >>> b = {"seg": {"miou": 38.0, "acc": 64.0}, "depth": {"abs": 0.6}}
    >>> d = {"seg": "max", "depth": "min"}
    >>> round(delta_m(m, b, d), 3), round(delta_m(m, b, d, average="task"), 3)
    (8.352, 10.43)
    """
    values, bases = nested(metrics), nested(baseline)
    if not values or set(values) != set(bases) or any(set(values[t]) != set(bases[t]) for t in values):
        raise ValueError(
            f"metrics and baseline must hold the same, non-empty tasks and metrics: {values} vs {bases}"
        )
    signs = nested_directions(directions, values)
    if average not in ("metric", "task"):
        raise ValueError(f"average must be 'metric' or 'task', got {average!r}")
    per_task = {
        t: [relative_improvement(values[t][k], bases[t][k], signs[t][k]) for k in values[t]] for t in values
    }
    if average == "task":
        return sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)
    flat = [x for v in per_task.values() for x in v]
    return sum(flat) / len(flat)


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
