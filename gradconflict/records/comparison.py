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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gradconflict._strict_json import strict
from gradconflict.records.gains import (
    GAIN_ALPHA,
    GAIN_FLOOR,
    GainTest,
    IdenticalSeedsWarning,
    SplitGain,
    judge_gain,
    seeds_vary,
    split_gains,
)
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


@dataclass(repr=False)
class VariantRecord:
    """One variant's run: per-step training losses, evaluations and running costs.

    Attributes:
        name: the variant (``"shared"``, ``"independent"``, ``"lora"``, ``"branched"``, ``"branched@<point>"``,
            ``"shared+<method>"``, or any label).
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
        branch_at: the branched variant's branch point (``None``: not run), or the list of points of a comparison
            branched at several (its variants ``branched@<point>``, in this order).
        groups: the branched variants' task groups.
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
    branch_at: int | str | list[int | str] | None = None
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
