"""What :func:`~gradconflict.split.compare` returns: one record per variant, a table per variant, task and metric,
and the gain of each split over the shared model across seeds.

The package's one rule for a ceiling (does a split beat the shared model?) is :func:`judge_gain`: a paired,
one-sided test across seeds with a floor on the effect. :func:`split_gains`, :attr:`ComparisonResult.ceiling_broken`,
:func:`~gradconflict.split.evaluate_split` and the diagnosis' ``ceiling`` signal all read it.

Delta-m% is read at **one checkpoint per variant**, the same evaluation step for every task of that variant: its
final evaluation (``select="final"``, the default) or the evaluation with the best Delta-m% itself
(``select="best"``). Taking each task's best at a different step would report a model that never existed.

>>> rec = VariantRecord("shared", {"a": [3.0, 2.0, 1.0]}, [(3, {"a": 0.5})], {"a": "min"}, params=10)
>>> res = ComparisonResult({"shared": rec}, ["a"], steps=3, split_step=0)
>>> res.rows[0]["value"], res.rows[0]["rise_share"]
(0.5, 0.0)
>>> res.to_markdown().splitlines()[0].split(" | ")[6]   # one baseline per table, named in its header
'Δm% vs independent'
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from scipy import stats

from gradconflict._strict_json import strict
from gradconflict.records.measures import (
    Direction,
    Smoothness,
    delta_m,
    nested,
    nested_directions,
    relative_improvement,
    smoothness,
    task_improvement,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GAIN_ALPHA",
    "GAIN_FLOOR",
    "ComparisonResult",
    "GainTest",
    "IdenticalSeedsWarning",
    "SplitGain",
    "VariantRecord",
    "judge_gain",
    "seeds_vary",
    "split_gains",
]

#: ``{task: {metric: value}}``: one evaluation of every metric of every task.
Evaluation = dict[str, dict[str, float]]
Select = Literal["final", "best"]
Average = Literal["metric", "task"]

#: The smallest gain that counts, in percent (Delta-m% points, or a task's mean relative improvement): a split
#: that lifts the tasks by less is not worth its copies, however consistent, and a difference in the fourth digit
#: is no gain.
GAIN_FLOOR = 1.0
#: The level of the one-sided paired test of :func:`judge_gain`.
GAIN_ALPHA = 0.05


class IdenticalSeedsWarning(UserWarning):
    """Runs meant as different seeds are bit-identical: the seed reaches neither the model nor the data (a model
    factory that seeds itself, fixed batches), so they measure no seed-to-seed variation."""


@dataclass(frozen=True)
class GainTest:
    """The ceiling rule's verdict on one gain measured over seeds (see :func:`judge_gain`).

    Attributes:
        per_seed: the gain on each seed, in percent (positive: the split is better).
        mean: their mean.
        p_value: the one-sided paired t-test's p-value for "the mean gain exceeds ``floor``" (NaN: not tested).
        floor: the smallest gain that counts.
        alpha: the test's level.
        seeds_vary: False when the seeds changed nothing (identical runs): their agreement proves nothing.
        beyond: True: a gain beyond the floor, confirmed by the test; False: no gain beyond the floor;
            ``None``: cannot tell (one seed above the floor, or seeds that change nothing).

    >>> judge_gain([25.5, 26.0, 29.4]).beyond
    True
    """

    per_seed: list[float]
    mean: float
    p_value: float
    floor: float
    alpha: float
    seeds_vary: bool
    beyond: bool | None


def judge_gain(
    per_seed: Sequence[float], *, floor: float = GAIN_FLOOR, alpha: float = GAIN_ALPHA, seeds_vary: bool = True
) -> GainTest:
    """The one ceiling rule: does a split (or any variant) beat the shared model?

    ``per_seed`` holds one paired gain per seed, in percent: the variant against the shared model of the *same*
    seed, trained on the same batches (Delta-m% for a model, a task's mean relative improvement for one task).
    The rule:

    - the mean gain must exceed ``floor`` (:data:`GAIN_FLOOR`, 1%): a smaller gain never counts (``False``);
    - and a one-sided one-sample t-test of the per-seed gains against the floor (H0: mean gain <= floor, the
      paired test of the two variants' seed-by-seed results) must reject at ``alpha`` (:data:`GAIN_ALPHA`,
      0.05), on at least two seeds whose runs differ: then ``True``; if it does not reject, ``False``.
    - ``None`` (cannot tell) when the mean exceeds the floor but there is one seed only, or the seeds change
      nothing (``seeds_vary=False``: the caller found the runs of different seeds bit-identical, see
      :func:`seeds_vary`). Identical runs have no spread, and would make any gain look certain.

    Three seeds that agree (+25.5, +26.0, +29.4%) pass; so do +60.7, +35.3, +18.4% (p = 0.047); a gain
    that is large on one seed and negative on the others does not.

    >>> t = judge_gain([60.7, 35.3, 18.4])
    >>> t.beyond, round(t.p_value, 3)
    (True, 0.047)
    >>> judge_gain([40.0, -5.0, -3.0]).beyond, judge_gain([0.0004, 0.0003, 0.0005]).beyond
    (False, False)
    >>> judge_gain([12.0]).beyond, judge_gain([12.0, 12.5, 12.2], seeds_vary=False).beyond  # one seed; identical runs
    (None, None)
    """
    values = [float(v) for v in per_seed]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"judge_gain needs one finite gain per seed, got {values}")
    mean = statistics.fmean(values)
    p_value = math.nan
    if mean <= floor:
        beyond: bool | None = False
    elif len(values) < 2 or not seeds_vary:
        beyond = None
    else:
        if len(set(values)) == 1:
            p_value = 0.0  # the same gain on every seed: the t statistic is infinite
        else:
            with warnings.catch_warnings():  # nearly equal gains: scipy warns of precision, the verdict stands
                warnings.simplefilter("ignore", RuntimeWarning)
                p_value = float(stats.ttest_1samp(values, floor, alternative="greater").pvalue)
        beyond = p_value < alpha
    return GainTest(values, mean, p_value, floor, alpha, seeds_vary, beyond)


@dataclass(repr=False)
class VariantRecord:
    """One variant's run: per-step training losses, evaluations and running costs.

    Attributes:
        name: the variant (``"shared"``, ``"independent"``, ``"lora"``, ``"branched"``, or any label).
        losses: task -> training loss at every step.
        evals: ``(steps done, {task: {metric: value}})`` at each evaluation (``{task: value}`` is accepted and
            read as one metric per task, named after the task).
        directions: ``{task: {metric: "max" | "min"}}`` (or one per task): which way each metric improves.
        params: parameter entries needed to serve every task.
        step_ms: wall-clock milliseconds of one training step (all tasks), the median of steps timed in turn with
            the other variants' (round-robin, so that a change in the machine's load touches every variant alike).
        latency_ms: wall-clock milliseconds of one inference call on one batch, all tasks: the median of calls
            timed round-robin likewise.
        memory_mb: training-step memory (CUDA: peak allocated; CPU: estimate, see ``gradconflict.split.costs``).
        start: the step where this variant's own training began (after the shared phase, for lora and branched).
        step_cpu_ms: the process's CPU time for one training step, the median of the same steps: on a loaded
            machine the wall time grows, the CPU time much less.
        latency_cpu_ms: the process's CPU time for one inference call, the median of the same calls.

    >>> rec = VariantRecord("shared", {"a": [2.0, 1.0]}, [(1, {"a": 0.9}), (2, {"a": 1.1})], {"a": "min"})
    >>> rec.final()
    (2, {'a': {'a': 1.1}})
    >>> rec.checkpoint("best")        # the evaluation with the best Delta-m% against the final one
    (1, {'a': {'a': 0.9}})
    """

    name: str
    losses: dict[str, list[float]]
    evals: list[tuple[int, Evaluation]]
    directions: dict[str, dict[str, Direction]]
    params: int = 0
    step_ms: float = math.nan
    latency_ms: float = math.nan
    memory_mb: float = math.nan
    start: int = 0
    step_cpu_ms: float = math.nan
    latency_cpu_ms: float = math.nan

    def __post_init__(self) -> None:
        self.evals = [(int(step), nested(metrics)) for step, metrics in self.evals]
        if not self.evals:
            raise ValueError(f"variant {self.name!r} has no evaluation: compare() evaluates it at least once")
        self.directions = nested_directions(self.directions, self.evals[-1][1])

    @property
    def tasks(self) -> list[str]:
        """The task names."""
        return list(self.losses)

    def __repr__(self) -> str:
        steps = max((len(v) for v in self.losses.values()), default=0)
        return f"VariantRecord({self.name!r}, tasks={self.tasks}, steps={steps}, params={self.params})"

    def final(self) -> tuple[int, Evaluation]:
        """The last evaluation: ``(step, {task: {metric: value}})``."""
        step, metrics = self.evals[-1]
        return step, {t: dict(m) for t, m in metrics.items()}

    def checkpoint(
        self, select: Select = "final", reference: Evaluation | None = None, average: Average = "metric"
    ) -> tuple[int, Evaluation]:
        """The one evaluation that stands for this variant, every task at the same step: the final one, or with
        ``select="best"`` the one whose Delta-m% against ``reference`` (default: this variant's final evaluation)
        is the highest (the earliest on ties)."""
        if select == "final":
            return self.final()
        if select != "best":
            raise ValueError(f"select must be 'final' or 'best', got {select!r}")
        base = reference if reference is not None else self.final()[1]
        scores = [delta_m(m, base, self.directions, average=average) for _, m in self.evals]
        step, metrics = self.evals[scores.index(max(scores))]
        return step, {t: dict(m) for t, m in metrics.items()}

    def smoothness(self, start: int = 0, span: int = 10) -> dict[str, Smoothness]:
        """Each task's :func:`~gradconflict.split.smoothness` over the training losses from step ``start``."""
        return {t: smoothness(v[start:], span) for t, v in self.losses.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (JSON-ready; non-finite numbers become ``None``)."""
        return strict(
            {
                "name": self.name, "losses": self.losses, "evals": [[s, m] for s, m in self.evals],
                "directions": self.directions, "params": self.params, "step_ms": self.step_ms,
                "latency_ms": self.latency_ms, "memory_mb": self.memory_mb, "start": self.start,
                "step_cpu_ms": self.step_cpu_ms, "latency_cpu_ms": self.latency_cpu_ms,
            }
        )




@dataclass(repr=False)
class ComparisonResult:
    """The comparison experiment's outcome: per-variant records and the table per variant, task and metric.

    Delta-m% (positive: better than the baseline) is read at one checkpoint per variant (see the module
    docstring): ``select="final"`` or ``"best"`` (the best by Delta-m% against the baseline's checkpoint, the
    baseline's own being its best against its final evaluation), averaged per metric or per task (``average``).
    Smoothness is measured over the same window for every variant, from ``split_step`` (where lora and branched
    leave the shared model) to the end. ``dataclasses.replace(result, select="best")`` reads the same runs another
    way.

    Attributes:
        variants: variant name -> :class:`VariantRecord`, in the order run.
        tasks: task names.
        steps: the step budget.
        split_step: steps of shared training before the lora and branched variants split.
        notes: remarks such as a variant that was skipped, and why.
        select: ``"final"`` or ``"best"``: which evaluation stands for each variant.
        baseline: the variant Delta-m% is measured against (``"independent"``: the single-task models).
        average: ``"metric"`` or ``"task"`` (see :func:`~gradconflict.split.delta_m`).
        branch_at: the branched variant's branch point (``None``: not run).
        groups: the branched variant's task groups.
        seed: the seed the run was made with (``None``: not known).

    >>> shared = VariantRecord("shared", {"a": [1.0]}, [(1, {"a": 0.5})], {"a": "min"})
    >>> single = VariantRecord("independent", {"a": [1.0]}, [(1, {"a": 0.4})], {"a": "min"})
    >>> res = ComparisonResult({"shared": shared, "independent": single}, ["a"], steps=1, split_step=0)
    >>> res.ceiling_broken, round(res.delta_m["shared"], 6)
    ({'independent': ['a']}, -25.0)
    """

    variants: dict[str, VariantRecord]
    tasks: list[str]
    steps: int
    split_step: int
    notes: list[str] = field(default_factory=list)
    select: Select = "final"
    baseline: str = "independent"
    average: Average = "metric"
    branch_at: int | str | None = None
    groups: list[list[str]] | None = None
    seed: int | None = None

    def __repr__(self) -> str:
        return (
            f"ComparisonResult(variants={list(self.variants)}, tasks={self.tasks}, steps={self.steps}, "
            f"split_step={self.split_step})"
        )

    def _repr_html_(self) -> str:
        """The comparison's table as HTML tables for Jupyter, those of the HTML report
        (:mod:`gradconflict.reporting.notebook`)."""
        from gradconflict.reporting.notebook import comparison_html

        return comparison_html(self)

    def __str__(self) -> str:
        return self.to_markdown()

    def __getitem__(self, variant: str) -> VariantRecord:
        try:
            return self.variants[variant]
        except KeyError:
            raise KeyError(f"no variant {variant!r} in this result; it has {list(self.variants)}") from None

    @property
    def history(self) -> dict[str, dict[str, list[float]]]:
        """Variant -> task -> training loss at every step."""
        return {name: rec.losses for name, rec in self.variants.items()}

    @property
    def checkpoints(self) -> dict[str, tuple[int, Evaluation]]:
        """Variant -> its checkpoint ``(step, {task: {metric: value}})`` under :attr:`select`."""
        base = self.variants.get(self.baseline)
        base_cp = base.checkpoint(self.select, average=self.average) if base is not None else None
        reference = base_cp[1] if base_cp is not None else None
        return {
            name: base_cp if name == self.baseline and base_cp is not None
            else rec.checkpoint(self.select, reference, self.average)
            for name, rec in self.variants.items()
        }

    @property
    def delta_m(self) -> dict[str, float]:
        """Variant -> Delta-m% of its checkpoint against the baseline's (positive: better; empty without the
        baseline variant)."""
        if self.baseline not in self.variants:
            return {}
        cps = self.checkpoints
        base, directions = cps[self.baseline][1], self.variants[self.baseline].directions
        return {name: delta_m(cp[1], base, directions, average=self.average) for name, cp in cps.items()}

    @property
    def ceiling_broken(self) -> dict[str, list[str]]:
        """Variant -> the tasks whose checkpoint beats the shared model's by more than the floor of
        :func:`judge_gain` (the mean improvement over the task's metrics, in percent); empty without ``"shared"``.

        One run is one seed: no test has confirmed these gains. :func:`split_gains` over a few seeds does."""
        if "shared" not in self.variants:
            return {}
        cps = self.checkpoints
        ceiling, directions = cps["shared"][1], self.variants["shared"].directions
        return {
            name: [
                t for t in self.tasks
                if judge_gain([task_improvement(cp[1], ceiling, directions, t)]).beyond is not False
            ]
            for name, cp in cps.items()
            if name != "shared"
        }

    @property
    def any_ceiling_broken(self) -> bool:
        """True when some variant lifted some task above its shared-model ceiling."""
        return any(self.ceiling_broken.values())

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per (variant, task, metric): the checkpoint's step and value, the final value, the metric's
        Delta-m% term against the baseline, the task's smoothness and the variant's costs."""
        cps = self.checkpoints
        base = cps.get(self.baseline)
        broken = self.ceiling_broken
        rows = []
        for name, rec in self.variants.items():
            step, metrics = cps[name]
            final, smooth = rec.final()[1], rec.smoothness(self.split_step)
            for task in self.tasks:
                for metric, value in metrics[task].items():
                    direction = rec.directions[task][metric]
                    rows.append(
                        {
                            "variant": name, "task": task, "metric": metric, "direction": direction, "step": step,
                            "value": value, "final": final[task][metric],
                            "delta_m": relative_improvement(value, base[1][task][metric], direction)
                            if base is not None else None,
                            "rise_share": smooth[task].rise_share, "diff_variance": smooth[task].diff_variance,
                            "params": rec.params, "step_ms": rec.step_ms, "step_cpu_ms": rec.step_cpu_ms,
                            "latency_ms": rec.latency_ms, "latency_cpu_ms": rec.latency_cpu_ms,
                            "memory_mb": rec.memory_mb,
                            "beats_shared": task in broken[name] if name in broken else None,
                        }
                    )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view: rows, Delta-m% per variant, broken ceilings, settings, notes and each record."""
        return strict(
            {
                "tasks": self.tasks, "steps": self.steps, "split_step": self.split_step, "notes": self.notes,
                "select": self.select, "baseline": self.baseline, "average": self.average,
                "branch_at": self.branch_at, "groups": self.groups, "seed": self.seed,
                "rows": self.rows, "delta_m": self.delta_m, "ceiling_broken": self.ceiling_broken,
                "variants": {name: rec.to_dict() for name, rec in self.variants.items()},
            }
        )

    def to_dataframe(self) -> pd.DataFrame:
        """The :attr:`rows` as a pandas DataFrame indexed by (variant, task, metric) (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(
                "ComparisonResult.to_dataframe() needs pandas: pip install 'gradconflict[pandas]'"
            ) from err
        return pd.DataFrame(self.rows).set_index(["variant", "task", "metric"])

    def to_markdown(self) -> str:
        """The table as Markdown, then Delta-m% per variant (with its sign and checkpoint stated), the broken
        ceilings and any notes. Every Delta-m% in it is against one baseline, :attr:`baseline`, named in the
        column's header."""
        columns = [
            ("variant", "variant"), ("task", "task"), ("metric", "metric"), ("direction", "dir"), ("step", "step"),
            ("value", "value"), ("delta_m", f"Δm% vs {self.baseline}"), ("rise_share", "rises"),
            ("diff_variance", "diff var"), ("params", "params"), ("step_ms", "step ms"),
            ("step_cpu_ms", "step CPU ms"), ("latency_ms", "latency ms"), ("latency_cpu_ms", "latency CPU ms"),
            ("memory_mb", "memory MB"), ("beats_shared", f"beats shared by >{GAIN_FLOOR:g}%"),
        ]
        lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + " --- |" * len(columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row[key]) for key, _ in columns) + " |")
        lines.append("")
        if self.delta_m:
            lines.append(
                f"Δm% vs {self.baseline} (positive: better; {self.select} checkpoint; averaged per {self.average}): "
                + ", ".join(f"{k} {v:+.2f}" for k, v in self.delta_m.items())
            )
        if "shared" in self.variants:
            broken = {k: v for k, v in self.ceiling_broken.items() if v}
            lines.append(
                f"Shared-model ceiling broken by more than {GAIN_FLOOR:g}% (one seed, untested: judge over seeds "
                "with split_gains): "
                + ("; ".join(f"{k}: {', '.join(v)}" for k, v in broken.items()) if broken else "by no variant")
            )
        lines.extend(f"Note: {note}" for note in self.notes)
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value + 0.0:.4g}" if math.isfinite(value) else "-"  # + 0.0 turns -0.0 into 0.0
    return str(value)


@dataclass(frozen=True)
class SplitGain:
    """How much one variant beats the shared model, paired seed by seed, judged by :func:`judge_gain`.

    Attributes:
        variant: the variant's name.
        per_seed: its Delta-m% against the shared model of the same seed (same data order and initialisation).
        mean: the mean of ``per_seed``.
        spread: the standard deviation of the shared model's own Delta-m% across seeds (against its mean over the
            seeds): how much a model moves from seed to seed (NaN with one seed). Shown, not judged by.
        beyond: :attr:`GainTest.beyond`: True when the paired test confirms a gain above the floor, False when
            there is none, ``None`` when one seed, or seeds that change nothing, cannot tell.
        p_value: the paired test's p-value (NaN: not tested).
        floor: the smallest gain that counts (:data:`GAIN_FLOOR`).
        seeds_vary: False when runs of different seeds were bit-identical (see :class:`IdenticalSeedsWarning`).
    """

    variant: str
    per_seed: list[float]
    mean: float
    spread: float
    beyond: bool | None
    p_value: float = math.nan
    floor: float = GAIN_FLOOR
    seeds_vary: bool = True


def _mean_evaluation(evaluations: Sequence[Evaluation]) -> Evaluation:
    return {
        t: {k: statistics.fmean(e[t][k] for e in evaluations) for k in evaluations[0][t]} for t in evaluations[0]
    }


def _same_run(a: VariantRecord, b: VariantRecord) -> bool:
    """Whether two records hold bit-identical training losses and evaluations."""
    return a.losses == b.losses and a.evals == b.evals


def seeds_vary(results: Sequence[ComparisonResult]) -> bool:
    """False when two of ``results`` (one per seed) share a seed or hold bit-identical shared runs: the seed
    changed nothing (a model factory that seeds itself, with fixed batches), so the runs measure no spread.

    >>> rec = VariantRecord("shared", {"a": [1.0]}, [(1, {"a": 0.5})], {"a": "min"})
    >>> seeds_vary([ComparisonResult({"shared": rec}, ["a"], 1, 0) for _ in range(2)])
    False
    """
    seeds = [r.seed for r in results if r.seed is not None]
    if len(set(seeds)) < len(seeds):
        return False
    runs = [r["shared"] for r in results if "shared" in r.variants]
    return not any(_same_run(a, b) for i, a in enumerate(runs) for b in runs[i + 1:])


def split_gains(results: Sequence[ComparisonResult], *, floor: float = GAIN_FLOOR) -> dict[str, SplitGain]:
    """Each variant's gain over ``"shared"`` across ``results`` (one :class:`ComparisonResult` per seed, each with
    a ``"shared"`` variant): Delta-m% of its checkpoint against the same seed's shared checkpoint, judged by the
    one ceiling rule, :func:`judge_gain` (a one-sided paired t-test against ``floor``). Each result's ``select``
    and ``average`` apply.

    Runs of different seeds that are bit-identical (or results that share a seed) are flagged: an
    :class:`IdenticalSeedsWarning`, ``seeds_vary=False`` and ``beyond=None`` unless the gain is under the floor.

    >>> def rec(name, seed, value):
    ...     return VariantRecord(name, {"a": [1.0]}, [(1, {"a": value + 0.01 * seed})], {"a": "min"})
    >>> runs = [ComparisonResult({"shared": rec("shared", s, 1.0), "branched": rec("branched", s, 0.5)}, ["a"], 1, 0)
    ...         for s in range(3)]
    >>> g = split_gains(runs)["branched"]
    >>> [round(x, 1) for x in g.per_seed], round(g.spread, 2), g.beyond, g.p_value < 0.001
    ([50.0, 49.5, 49.0], 0.99, True, True)
    """
    if not results:
        raise ValueError("split_gains needs at least one ComparisonResult (one per seed)")
    missing = [k for k, r in enumerate(results) if "shared" not in r.variants]
    if missing:
        raise ValueError(f"results {missing} have no 'shared' variant: the gains are measured against it")
    varied = seeds_vary(results)
    if len(results) > 1 and not varied:
        warnings.warn(
            "the comparison's seeds changed nothing: two results share a seed or hold bit-identical shared runs "
            "(does the model factory seed itself? are the batches fixed?), so they show no spread and prove no "
            "gain; let compare(seed=...) reach the model (no torch.manual_seed inside the factory) and the data",
            IdenticalSeedsWarning,
            stacklevel=2,
        )
    cps = [r.checkpoints for r in results]
    shared = [cp["shared"][1] for cp in cps]
    directions = results[0]["shared"].directions
    average = results[0].average
    center = _mean_evaluation(shared)
    own = [delta_m(s, center, directions, average=average) for s in shared]
    spread = statistics.stdev(own) if len(own) > 1 else math.nan
    names = [n for n in results[0].variants if n != "shared" and all(n in r.variants for r in results)]
    out = {}
    for name in names:
        per_seed = [delta_m(cp[name][1], s, directions, average=average) for cp, s in zip(cps, shared)]
        test = judge_gain(per_seed, floor=floor, seeds_vary=varied)
        out[name] = SplitGain(name, test.per_seed, test.mean, spread, test.beyond, test.p_value, floor, test.seeds_vary)
    return out
