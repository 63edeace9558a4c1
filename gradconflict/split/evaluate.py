"""Post-split evaluation: judge a split on three criteria, each with the warning it can raise.

- **convergence**: each task's loss falls at least as smoothly after the split (the share of steps where its
  smoothed loss rises does not grow by more than ``tolerance``).
- **ceiling**: at least one task beats what it reached before the split, by the package's one ceiling rule,
  :func:`~gradconflict.records.comparison.judge_gain`: a one-sided paired t-test across seeds against a floor of
  1% (compare() records: the task's metrics at each side's final evaluation; histories: the lowest smoothed
  training loss). One seed cannot confirm a gain: above the floor, the criterion is ``None`` (cannot tell).
- **cost**: parameters, inference latency (the process's CPU time where measured, which a loaded machine does not
  inflate as it does the wall time) and training memory each grow by at most ``max_cost_ratio``.

``before`` and ``after`` are :class:`~gradconflict.History` objects (their per-step task losses are used) or
records of :func:`~gradconflict.split.compare` (``result["shared"]``; these also carry metrics and costs), or
lists of either, one per seed, paired in order; or a list of compare() results, one per seed, and a variant name.

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
>>> [(c.name, c.passed) for c in verdict.criteria]   # one run: a gain above the floor, which no test confirms
[('convergence', True), ('ceiling', None), ('cost', None)]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gradconflict.records.comparison import (
    GAIN_FLOOR,
    ComparisonResult,
    GainTest,
    VariantRecord,
    judge_gain,
    seeds_vary,
)
from gradconflict.records.history import History
from gradconflict.records.measures import relative_improvement, smoothed, smoothness, task_improvement

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
    """One side of the comparison on one seed, in the common form the criteria read."""

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


Pair = tuple[_Side, _Side]


def _same(a: _Side, b: _Side) -> bool:
    """Whether two runs are bit-identical (losses, and evaluations where recorded)."""
    evals = (a.record.evals if a.record else None) == (b.record.evals if b.record else None)
    return a.losses == b.losses and evals


def _windows(before: _Side, after: _Side) -> tuple[int, int]:
    if before.record is not None and after.record is not None:
        # two variants of one compare() run share their step axis: judge both over the same window
        start = max(before.start, after.start)
        return start, start
    return before.start, after.start


def _convergence(pairs: list[Pair], tasks: list[str], span: int, tolerance: float) -> Criterion:
    parts, verdicts = [], []
    for task in tasks:
        shares: tuple[list[float], list[float]] = ([], [])
        variances: tuple[list[float], list[float]] = ([], [])
        for before, after in pairs:
            b_start, a_start = _windows(before, after)
            b, a = smoothness(before.losses[task][b_start:], span), smoothness(after.losses[task][a_start:], span)
            if math.isnan(a.rise_share) or math.isnan(b.rise_share):
                continue
            for side, measured in enumerate((b, a)):
                shares[side].append(measured.rise_share)
                variances[side].append(measured.diff_variance)
        if not shares[0]:
            continue
        b_share, a_share = statistics.fmean(shares[0]), statistics.fmean(shares[1])
        verdicts.append(a_share <= b_share + tolerance)
        parts.append(
            f"{task} {b_share:.0%} -> {a_share:.0%} (difference variance {statistics.fmean(variances[0]):.3g} -> "
            f"{statistics.fmean(variances[1]):.3g})"
        )
    if not verdicts:
        return Criterion("convergence", None, "too few loss values to judge (need 3 per task)", WARNINGS["convergence"])
    over = f" (mean over {len(pairs)} seeds)" if len(pairs) > 1 else ""
    evidence = f"share of steps where the smoothed loss rises{over}, before -> after: " + "; ".join(parts) + "."
    return Criterion("convergence", all(verdicts), evidence, WARNINGS["convergence"])


def _gain(before: _Side, after: _Side, task: str, span: int) -> tuple[float, str]:
    """``task``'s gain after the split on one seed, in percent, and the values it compares."""
    if before.record is not None and after.record is not None:
        b_metrics, a_metrics = before.record.final()[1], after.record.final()[1]
        gain = task_improvement(a_metrics, b_metrics, before.record.directions, task)
        shown = ", ".join(f"{k} {b_metrics[task][k]:.4g} -> {a_metrics[task][k]:.4g}" for k in b_metrics[task])
        return gain, shown
    # histories carry training losses only: the lowest point of the moving average, robust to one lucky batch
    b_best = min(smoothed(before.losses[task], span), default=math.inf)
    a_best = min(smoothed(after.losses[task], span), default=math.inf)
    if not (math.isfinite(b_best) and math.isfinite(a_best)) or b_best == 0:
        return math.nan, f"{b_best:.4g} -> {a_best:.4g}"
    return relative_improvement(a_best, b_best, "min"), f"{b_best:.4g} -> {a_best:.4g}"


def _judged(test: GainTest) -> str:
    if test.beyond is True:
        return f"beyond the floor, p = {test.p_value:.3g}"
    if test.beyond is False:
        return "under the floor" if test.mean <= test.floor else f"not confirmed, p = {test.p_value:.3g}"
    if not test.seeds_vary:
        return "identical seeds: cannot tell"
    if len(test.per_seed) < 2:
        return "one seed: cannot tell"
    return f"cannot tell yet, p = {test.p_value:.3g} (about {test.seeds_needed} seeds in all would confirm it)"


def _ceiling(pairs: list[Pair], tasks: list[str], span: int, floor: float, varied: bool) -> Criterion:
    records = all(b.record is not None and a.record is not None for b, a in pairs)
    what = "metrics at each side's final evaluation" if records else "lowest smoothed training loss"
    tests: dict[str, GainTest] = {}
    parts = []
    for task in tasks:
        measured = [_gain(b, a, task, span) for b, a in pairs]
        gains = [g for g, _ in measured if math.isfinite(g)]
        if not gains:
            parts.append(f"{task} not measurable")
            continue
        tests[task] = judge_gain(gains, floor=floor, seeds_vary=varied)
        shown = f" ({measured[0][1]})" if len(pairs) == 1 else ""
        parts.append(f"{task} {tests[task].mean:+.3g}%{shown}: {_judged(tests[task])}")
    verdicts = [t.beyond for t in tests.values()]
    passed = True if True in verdicts else (False if verdicts and all(v is False for v in verdicts) else None)
    moved = [t for t, test in tests.items() if test.beyond]
    needed = [t.seeds_needed for t in tests.values() if t.seeds_needed is not None]
    verdict = (
        f"{', '.join(moved)} beat the shared ceiling" if moved
        else "no task beat its shared ceiling" if passed is False
        else f"run more seeds to judge the gain (about {min(needed)} in all)" if needed
        else "run over a few seeds (a list of runs, paired in order) to judge the gain"
    )
    evidence = (
        f"gain after the split on the {what}, mean over {len(pairs)} seed(s), judged by a one-sided paired t-test "
        f"against a {floor:g}% floor: " + "; ".join(parts) + f"; {verdict}."
    )
    return Criterion("ceiling", passed, evidence, WARNINGS["ceiling"])


def _cost(pairs: list[Pair], max_ratio: float) -> Criterion:
    if any(b.record is None or a.record is None for b, a in pairs):
        return Criterion(
            "cost", None, "histories carry no cost measurements; compare() records parameters, latency and memory",
            WARNINGS["cost"],
        )
    ratios: dict[str, list[float]] = {}
    for before, after in pairs:
        assert before.record is not None and after.record is not None
        cpu = all(math.isfinite(r.latency_cpu_ms) and r.latency_cpu_ms > 0 for r in (before.record, after.record))
        keys = {"params": "params", "memory_mb": "memory_mb"}
        keys["latency (CPU time)" if cpu else "latency (wall time)"] = "latency_cpu_ms" if cpu else "latency_ms"
        for label, key in keys.items():
            b, a = float(getattr(before.record, key)), float(getattr(after.record, key))
            if b > 0 and math.isfinite(a) and math.isfinite(b):
                ratios.setdefault(label, []).append(a / b)
    measured = {k: statistics.median(v) for k, v in ratios.items()}
    over = [k for k, r in measured.items() if r > max_ratio]
    parts = ", ".join(f"{k} x{r:.2f}" for k, r in measured.items())
    tail = f"over the x{max_ratio:g} budget: {', '.join(over)}" if over else f"all within the x{max_ratio:g} budget"
    return Criterion("cost", not over, f"after / before: {parts}; {tail}.", WARNINGS["cost"])


Run = History | VariantRecord


def _pairs(
    before: Run | ComparisonResult | Sequence[Run] | Sequence[ComparisonResult],
    after: Run | str | Sequence[Run],
) -> tuple[list[Pair], bool]:
    """The (before, after) sides, one pair per seed, and whether the seeds varied (no two runs identical)."""
    listed = list(before) if isinstance(before, Sequence) else [before]
    results = [r for r in listed if isinstance(r, ComparisonResult)]
    if results and len(results) == len(listed):
        if not isinstance(after, str):
            raise TypeError("with a ComparisonResult as `before`, pass `after` as a variant name, e.g. 'branched'")
        pairs = [(_side(r["shared"]), _side(r[after])) for r in results]
        return pairs, seeds_vary(results)
    if isinstance(after, str):
        raise TypeError("`after` may be a variant name only when `before` is a ComparisonResult")
    if isinstance(before, Sequence) != isinstance(after, Sequence):
        raise TypeError("pass `before` and `after` both as single runs, or both as lists of runs (one per seed)")
    befores = list(before) if isinstance(before, Sequence) else [before]
    afters = list(after) if isinstance(after, Sequence) else [after]
    if not befores or len(befores) != len(afters):
        raise ValueError(f"give one `after` run per `before` run (one per seed): got {len(befores)} and {len(afters)}")
    pairs = [(_side(b), _side(a)) for b, a in zip(befores, afters)]  # type: ignore[arg-type]
    firsts = [b for b, _ in pairs]
    return pairs, not any(_same(x, y) for i, x in enumerate(firsts) for y in firsts[i + 1:])


def evaluate_split(
    before: Run | ComparisonResult | Sequence[Run] | Sequence[ComparisonResult],
    after: Run | str | Sequence[Run],
    *,
    max_cost_ratio: float = 2.0,
    span: int = 10,
    tolerance: float = 0.02,
    floor: float = GAIN_FLOOR,
) -> SplitEvaluation:
    """Judge a split: does it converge more smoothly, break a ceiling, and stay affordable?

    Args:
        before: the shared model's run: a :class:`~gradconflict.History`, a compare() record
            (``result["shared"]``), or a whole :class:`ComparisonResult` (its ``"shared"`` variant); or a list of
            runs, one per seed (a list of compare() results, for several seeds of the comparison).
        after: the split model's run, in the same forms (a list: one per seed, in the order of ``before``); with
            compare() results as ``before``, the name of one of their variants (``"lora"``, ``"branched"``,
            ``"independent"``).
        max_cost_ratio: the largest acceptable growth of parameters, latency and memory (the median over seeds).
        span: span of the moving average used to smooth the losses.
        tolerance: how much a task's share of rising steps may grow before convergence counts as worse (a
            share, so 0.02 is two percentage points: one step in fifty, noise on short runs).
        floor: the smallest gain, in percent, that counts for the ceiling
            (:func:`~gradconflict.records.comparison.judge_gain`).

    Only the tasks present on both sides are judged. With two compare() records, smoothness is measured over the
    same window on both sides (from the later side's split step); a history is judged whole. Runs of different
    seeds that are bit-identical cannot confirm a gain (the ceiling says so).

    >>> rec = VariantRecord("x", {"a": [1.0, 0.5, 0.2]}, [(3, {"a": 0.2})], {"a": "min"}, 10, 1.0, 1.0, 1.0)
    >>> evaluate_split(rec, rec).failed   # a run judged against itself: no gain, so no ceiling broken
    ['ceiling']
    """
    pairs, varied = _pairs(before, after)
    tasks = [t for t in pairs[0][0].losses if all(t in b.losses and t in a.losses for b, a in pairs)]
    if not tasks:
        raise ValueError(f"before and after share no task: {list(pairs[0][0].losses)} vs {list(pairs[0][1].losses)}")
    return SplitEvaluation(
        (
            _convergence(pairs, tasks, span, tolerance),
            _ceiling(pairs, tasks, span, floor, varied),
            _cost(pairs, max_cost_ratio),
        )
    )
