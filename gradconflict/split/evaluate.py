"""Post-split evaluation: judge a split on three criteria, each with the warning it can raise.

- **convergence**: each task's loss falls at least as smoothly after the split (the share of steps where its
  smoothed loss rises does not grow by more than ``tolerance``).
- **ceiling**: at least one task beats what it reached before the split (compare() records: the task's metrics at
  each variant's checkpoint, the same evaluation step for every task of a variant).
- **cost**: parameters, inference latency and training memory each grow by at most ``max_cost_ratio``.

``before`` and ``after`` are :class:`~gradconflict.History` objects (their per-step task losses are used) or
records of :func:`~gradconflict.split.compare` (``result["shared"]``; these also carry metrics and costs).

>>> import torch
>>> from gradconflict import ConflictReport, History
>>> def history(curve):
...     h = History()
...     for s, (a, b) in enumerate(curve):
...         h.append(ConflictReport(("a", "b"), torch.eye(2), losses=torch.tensor([a, b]), step=s))
...     return h
>>> before = history([(1.0, 1.0), (0.8, 1.2), (0.9, 0.9), (0.7, 1.1), (0.8, 1.0)])
>>> after = history([(0.9, 1.0), (0.7, 0.9), (0.6, 0.8), (0.5, 0.7), (0.4, 0.6)])
>>> verdict = evaluate_split(before, after)
>>> [(c.name, c.passed) for c in verdict.criteria]
[('convergence', True), ('ceiling', True), ('cost', None)]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from gradconflict.records.comparison import ComparisonResult, VariantRecord
from gradconflict.records.history import History
from gradconflict.records.measures import smoothed, smoothness, task_improvement

__all__ = ["Criterion", "SplitEvaluation", "evaluate_split"]

#: What each criterion's failure means.
WARNINGS = {
    "convergence": "the loss still oscillates after the split: the trouble is the data, not the sharing",
    "ceiling": "no task moved: the model's capacity was not the limit, so splitting was not the cure",
    "cost": "running cost soars: the machines cannot carry the copies",
}


@dataclass(frozen=True)
class Criterion:
    """One criterion's verdict.

    Attributes:
        name: ``"convergence"``, ``"ceiling"`` or ``"cost"``.
        passed: True or False; ``None`` when the inputs cannot tell (e.g. histories carry no costs).
        evidence: a sentence with the numbers behind the verdict.
        warning: what a failure of this criterion means.

    >>> Criterion("ceiling", True, "a beat its shared ceiling.", WARNINGS["ceiling"]).passed
    True
    """

    name: str
    passed: bool | None
    evidence: str
    warning: str


@dataclass(frozen=True)
class SplitEvaluation:
    """The three criteria's verdicts on a split; ``str()`` reads as a short report.

    >>> ev = SplitEvaluation((Criterion("cost", False, "latency x3.0", WARNINGS["cost"]),))
    >>> ev.held, ev.failed
    ([], ['cost'])
    """

    criteria: tuple[Criterion, ...]

    @property
    def held(self) -> list[str]:
        """Names of the criteria that held."""
        return [c.name for c in self.criteria if c.passed is True]

    @property
    def failed(self) -> list[str]:
        """Names of the criteria that failed."""
        return [c.name for c in self.criteria if c.passed is False]

    def __getitem__(self, name: str) -> Criterion:
        for c in self.criteria:
            if c.name == name:
                return c
        raise KeyError(f"no criterion {name!r}; there are {[c.name for c in self.criteria]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view: each criterion's fields, and the lists of those that held and failed."""
        return {"criteria": [asdict(c) for c in self.criteria], "held": self.held, "failed": self.failed}

    def _repr_html_(self) -> str:
        """Each criterion as HTML tables for Jupyter, those of the HTML report
        (:mod:`gradconflict.reporting.notebook`)."""
        from gradconflict.reporting.notebook import evaluation_html

        return evaluation_html(self)

    def __str__(self) -> str:
        lines = ["Split evaluation:"]
        for c in self.criteria:
            mark = {True: "held", False: "FAILED", None: "n/a"}[c.passed]
            lines.append(f"  {c.name}: {mark}. {c.evidence}")
            if c.passed is False:
                lines.append(f"    warning: {c.warning}")
        return "\n".join(lines)


@dataclass
class _Side:
    """One side of the comparison, in the common form the criteria read."""

    losses: dict[str, list[float]]
    start: int
    record: VariantRecord | None


def _side(value: History | VariantRecord) -> _Side:
    if isinstance(value, VariantRecord):
        return _Side(value.losses, value.start, value)
    if isinstance(value, History):
        losses: dict[str, list[float]] = {}
        for report in value.reports:
            if report.losses is not None:
                for task, loss in zip(report.tasks, report.losses.tolist()):
                    losses.setdefault(task, []).append(loss)
        if not losses:
            raise ValueError("the History holds no losses: record them with ConflictMonitor.backward(losses)")
        return _Side(losses, 0, None)
    raise TypeError(
        f"expected a gradconflict History or a compare() record (result['shared']), got {type(value).__name__}"
    )


def _convergence(before: _Side, after: _Side, tasks: list[str], span: int, tolerance: float) -> Criterion:
    if before.record is not None and after.record is not None:
        # two variants of one compare() run share their step axis: judge both over the same window
        b_start = a_start = max(before.start, after.start)
    else:
        b_start, a_start = before.start, after.start
    parts, verdicts = [], []
    for task in tasks:
        b, a = smoothness(before.losses[task][b_start:], span), smoothness(after.losses[task][a_start:], span)
        if math.isnan(a.rise_share) or math.isnan(b.rise_share):
            continue
        verdicts.append(a.rise_share <= b.rise_share + tolerance)
        parts.append(
            f"{task} {b.rise_share:.0%} -> {a.rise_share:.0%} (difference variance {b.diff_variance:.3g} -> "
            f"{a.diff_variance:.3g})"
        )
    if not verdicts:
        return Criterion("convergence", None, "too few loss values to judge (need 3 per task)", WARNINGS["convergence"])
    evidence = "share of steps where the smoothed loss rises, before -> after: " + "; ".join(parts) + "."
    return Criterion("convergence", all(verdicts), evidence, WARNINGS["convergence"])


def _ceiling(before: _Side, after: _Side, tasks: list[str], span: int) -> Criterion:
    if before.record is not None and after.record is not None:
        what = "metrics at each side's final evaluation (mean change over a task's metrics)"
        b_step, b_metrics = before.record.final()
        a_step, a_metrics = after.record.final()
        directions = before.record.directions
        gains = {t: task_improvement(a_metrics, b_metrics, directions, t) for t in tasks}
        parts = "; ".join(
            f"{t} " + ", ".join(f"{k} {b_metrics[t][k]:.4g} -> {a_metrics[t][k]:.4g}" for k in b_metrics[t])
            for t in tasks
        )
    else:  # histories carry training losses only: compare their smoothed minima
        what = "lowest smoothed training loss"
        # the lowest point of the moving average: a training loss's best, robust to one lucky batch
        b_best = {t: min(smoothed(before.losses[t], span), default=math.inf) for t in tasks}
        a_best = {t: min(smoothed(after.losses[t], span), default=math.inf) for t in tasks}
        gains = {t: b_best[t] - a_best[t] for t in tasks}
        parts = "; ".join(f"{t} {b_best[t]:.4g} -> {a_best[t]:.4g}" for t in tasks)
    moved = [t for t in tasks if gains[t] > 0]
    verdict = f"{', '.join(moved)} beat the shared ceiling" if moved else "no task beat its shared ceiling"
    return Criterion("ceiling", bool(moved), f"{what}, before -> after: {parts}; {verdict}.", WARNINGS["ceiling"])


def _cost(before: _Side, after: _Side, max_ratio: float) -> Criterion:
    if before.record is None or after.record is None:
        return Criterion(
            "cost", None, "histories carry no cost measurements; compare() records parameters, latency and memory",
            WARNINGS["cost"],
        )
    ratios = {}
    for key in ("params", "latency_ms", "memory_mb"):
        b, a = float(getattr(before.record, key)), float(getattr(after.record, key))
        ratios[key] = a / b if b > 0 and math.isfinite(a) else math.nan
    measured = {k: r for k, r in ratios.items() if math.isfinite(r)}
    over = [k for k, r in measured.items() if r > max_ratio]
    parts = ", ".join(f"{k} x{r:.2f}" for k, r in measured.items())
    tail = f"over the x{max_ratio:g} budget: {', '.join(over)}" if over else f"all within the x{max_ratio:g} budget"
    return Criterion("cost", not over, f"after / before: {parts}; {tail}.", WARNINGS["cost"])


def evaluate_split(
    before: History | VariantRecord | ComparisonResult,
    after: History | VariantRecord | str,
    *,
    max_cost_ratio: float = 2.0,
    span: int = 10,
    tolerance: float = 0.02,
) -> SplitEvaluation:
    """Judge a split: does it converge more smoothly, break a ceiling, and stay affordable?

    Args:
        before: the shared model's run: a :class:`~gradconflict.History`, a compare() record
            (``result["shared"]``), or a whole :class:`ComparisonResult` (its ``"shared"`` variant).
        after: the split model's run, in the same forms; with a ``ComparisonResult`` as ``before``, the name of
            one of its variants (``"lora"``, ``"branched"``, ``"independent"``).
        max_cost_ratio: the largest acceptable growth of parameters, latency and memory.
        span: span of the moving average used to smooth the losses.
        tolerance: how much a task's share of rising steps may grow before convergence counts as worse (a
            share, so 0.02 is two percentage points: one step in fifty, noise on short runs).

    Only the tasks present on both sides are judged. With two compare() records, smoothness is measured over the
    same window on both sides (from the later side's split step); a history is judged whole.

    >>> rec = VariantRecord("x", {"a": [1.0, 0.5, 0.2]}, [(3, {"a": 0.2})], {"a": "min"}, 10, 1.0, 1.0, 1.0)
    >>> evaluate_split(rec, rec).held   # a run judged against itself: smooth, no ceiling broken, same cost
    ['convergence', 'cost']
    """
    if isinstance(before, ComparisonResult):
        if not isinstance(after, str):
            raise TypeError("with a ComparisonResult as `before`, pass `after` as a variant name, e.g. 'branched'")
        before, after = before["shared"], before[after]
    elif isinstance(after, str):
        raise TypeError("`after` may be a variant name only when `before` is a ComparisonResult")
    b, a = _side(before), _side(after)
    tasks = [t for t in b.losses if t in a.losses]
    if not tasks:
        raise ValueError(f"before and after share no task: {list(b.losses)} vs {list(a.losses)}")
    return SplitEvaluation(
        (_convergence(b, a, tasks, span, tolerance), _ceiling(b, a, tasks, span), _cost(b, a, max_cost_ratio))
    )

