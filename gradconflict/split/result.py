"""What :func:`~gradconflict.split.compare` returns: one record per variant and a table per variant and task.

>>> rec = VariantRecord("shared", {"a": [3.0, 2.0, 1.0]}, [(3, {"a": 0.5})], {"a": "min"}, params=10)
>>> res = ComparisonResult({"shared": rec}, ["a"], steps=3, split_step=0)
>>> res.rows[0]["best"], res.rows[0]["rise_share"]
(0.5, 0.0)
>>> print(res.to_markdown().splitlines()[0])
| variant | task | best | final | Δm% | rises | diff var | params | step ms | latency ms | memory MB | beats shared |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradconflict.split.measures import Smoothness, delta_m, smoothness, task_improvement

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ComparisonResult", "VariantRecord"]


def _better(a: float, b: float, direction: str) -> bool:
    """True when ``a`` is strictly better than ``b``."""
    return a > b if direction == "max" else a < b


@dataclass(repr=False)
class VariantRecord:
    """One variant's run: per-step training losses, evaluations and running costs.

    Attributes:
        name: the variant (``"shared"``, ``"independent"``, ``"lora"``, ``"branched"``).
        losses: task -> training loss at every step.
        evals: ``(steps done, {task: metric})`` at each evaluation.
        directions: task -> ``"max"`` or ``"min"`` (which way the metric improves).
        params: parameter entries needed to serve every task.
        step_ms: median wall-clock time of one training step over the variant's own phase.
        latency_ms: fastest of ten inference calls on one batch, all tasks.
        memory_mb: training-step memory (CUDA: peak allocated; CPU: estimate, see ``gradconflict.split.costs``).
        start: the step where this variant's own training began (after the shared phase, for lora and branched).

    >>> rec = VariantRecord("shared", {"a": [2.0, 1.0]}, [(1, {"a": 0.9}), (2, {"a": 1.1})], {"a": "min"})
    >>> rec.best(), rec.final()
    ({'a': 0.9}, {'a': 1.1})
    """

    name: str
    losses: dict[str, list[float]]
    evals: list[tuple[int, dict[str, float]]]
    directions: dict[str, str]
    params: int = 0
    step_ms: float = math.nan
    latency_ms: float = math.nan
    memory_mb: float = math.nan
    start: int = 0

    @property
    def tasks(self) -> list[str]:
        """The task names."""
        return list(self.losses)

    def __repr__(self) -> str:
        steps = max((len(v) for v in self.losses.values()), default=0)
        return f"VariantRecord({self.name!r}, tasks={self.tasks}, steps={steps}, params={self.params})"

    def best(self) -> dict[str, float]:
        """Each task's best evaluated metric over the run."""
        out = {}
        for task, direction in self.directions.items():
            values = [m[task] for _, m in self.evals]
            out[task] = max(values) if direction == "max" else min(values)
        return out

    def final(self) -> dict[str, float]:
        """Each task's metric at the last evaluation."""
        return dict(self.evals[-1][1])

    def smoothness(self, start: int = 0, span: int = 10) -> dict[str, Smoothness]:
        """Each task's :func:`~gradconflict.split.smoothness` over the training losses from step ``start``."""
        return {t: smoothness(v[start:], span) for t, v in self.losses.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (JSON-ready; non-finite numbers become ``None``)."""
        return _plain(
            {
                "name": self.name, "losses": self.losses, "evals": [[s, m] for s, m in self.evals],
                "directions": self.directions, "params": self.params, "step_ms": self.step_ms,
                "latency_ms": self.latency_ms, "memory_mb": self.memory_mb, "start": self.start,
            }
        )


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(repr=False)
class ComparisonResult:
    """The comparison experiment's outcome: per-variant records and the table per variant and task.

    Smoothness is measured over the same window for every variant, from ``split_step`` (where lora and
    branched leave the shared model) to the end, so that the variants are compared like for like. Delta-m% uses
    the best metric against the independent variant's best.

    Attributes:
        variants: variant name -> :class:`VariantRecord`, in the order run.
        tasks: task names.
        steps: the step budget.
        split_step: steps of shared training before the lora and branched variants split.
        notes: remarks such as a variant that was skipped, and why.

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

    def __repr__(self) -> str:
        return (
            f"ComparisonResult(variants={list(self.variants)}, tasks={self.tasks}, steps={self.steps}, "
            f"split_step={self.split_step})"
        )

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
    def delta_m(self) -> dict[str, float]:
        """Variant -> Delta-m% of its best metrics against the independent variant's (empty without it)."""
        base = self.variants.get("independent")
        if base is None:
            return {}
        lower = {t: d == "min" for t, d in base.directions.items()}
        return {name: delta_m(rec.best(), base.best(), lower) for name, rec in self.variants.items()}

    @property
    def ceiling_broken(self) -> dict[str, list[str]]:
        """Variant -> the tasks whose best metric beats the shared model's best (empty without "shared")."""
        shared = self.variants.get("shared")
        if shared is None:
            return {}
        ceiling = shared.best()
        return {
            name: [t for t, v in rec.best().items() if _better(v, ceiling[t], rec.directions[t])]
            for name, rec in self.variants.items()
            if name != "shared"
        }

    @property
    def any_ceiling_broken(self) -> bool:
        """True when some variant lifted some task above its shared-model ceiling."""
        return any(self.ceiling_broken.values())

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per (variant, task): best and final metric, Delta-m% term, smoothness and costs."""
        base = self.variants.get("independent")
        broken = self.ceiling_broken
        rows = []
        for name, rec in self.variants.items():
            best, final, smooth = rec.best(), rec.final(), rec.smoothness(self.split_step)
            base_best = base.best() if base else {}
            for task in self.tasks:
                rows.append(
                    {
                        "variant": name,
                        "task": task,
                        "best": best[task],
                        "final": final[task],
                        "direction": rec.directions[task],
                        "delta_m": task_improvement(best[task], base_best[task], rec.directions[task] == "min")
                        if base
                        else None,
                        "rise_share": smooth[task].rise_share,
                        "diff_variance": smooth[task].diff_variance,
                        "params": rec.params,
                        "step_ms": rec.step_ms,
                        "latency_ms": rec.latency_ms,
                        "memory_mb": rec.memory_mb,
                        "beats_shared": task in broken[name] if name in broken else None,
                    }
                )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view: rows, Delta-m% per variant, broken ceilings, notes and each variant's record."""
        return _plain(
            {
                "tasks": self.tasks, "steps": self.steps, "split_step": self.split_step, "notes": self.notes,
                "rows": self.rows, "delta_m": self.delta_m, "ceiling_broken": self.ceiling_broken,
                "variants": {name: rec.to_dict() for name, rec in self.variants.items()},
            }
        )

    def to_dataframe(self) -> pd.DataFrame:
        """The :attr:`rows` as a pandas DataFrame indexed by (variant, task) (needs ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(
                "ComparisonResult.to_dataframe() needs pandas: pip install 'gradconflict[pandas]'"
            ) from err
        return pd.DataFrame(self.rows).set_index(["variant", "task"])

    def to_markdown(self) -> str:
        """The table as Markdown, followed by Delta-m% per variant, the broken ceilings and any notes."""
        columns = [
            ("variant", "variant"), ("task", "task"), ("best", "best"), ("final", "final"), ("delta_m", "Δm%"),
            ("rise_share", "rises"), ("diff_variance", "diff var"), ("params", "params"), ("step_ms", "step ms"),
            ("latency_ms", "latency ms"), ("memory_mb", "memory MB"), ("beats_shared", "beats shared"),
        ]
        lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + " --- |" * len(columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row[key]) for key, _ in columns) + " |")
        lines.append("")
        if self.delta_m:
            lines.append("Δm% vs independent: " + ", ".join(f"{k} {v:+.2f}" for k, v in self.delta_m.items()))
        if "shared" in self.variants:
            broken = {k: v for k, v in self.ceiling_broken.items() if v}
            lines.append(
                "Shared-model ceiling broken: "
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

