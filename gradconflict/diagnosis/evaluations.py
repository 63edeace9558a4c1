"""Evaluation-level zero-sum test: per-task metrics across evaluations (or runs), trade-offs and Pareto front.

A table has one row per evaluation and one column per metric; each metric has a direction, ``"max"`` (higher is
better) or ``"min"`` (lower is better), the library's one convention: there is no default, since an error metric
read as higher-is-better would turn every improvement into a regression. A *change* is the step from one row to
the next (``pairs="consecutive"``, evaluations over time) or between any two rows (``pairs="all"``, unordered
runs). A change is a *trade-off* when some metric improves by
more than the tolerance while another regresses by more than it (relative changes, as LibMTL's Delta-m).

>>> rows = [{"a": 0.80, "b": 0.70}, {"a": 0.82, "b": 0.69}, {"a": 0.81, "b": 0.71}, {"a": 0.84, "b": 0.74}]
>>> table = EvalTable.from_rows(rows, {"a": "max", "b": "max"})
>>> table.trade_off_share(tolerance=0.01)             # +2.5% / -1.4%, then -1.2% / +2.9%, then both up
0.6666666666666666
>>> table.pareto_front()                              # only the last evaluation is not dominated
[3]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np

from gradconflict.records.measures import Direction, check_direction

__all__ = ["EvalTable"]

Pairs = Literal["consecutive", "all"]


@dataclass(frozen=True)
class EvalTable:
    """Per-task metrics across evaluations.

    Attributes:
        metrics: metric names (columns).
        values: ``[evaluations, metrics]`` array.
        directions: the direction of each metric, ``"max"`` or ``"min"``.
    """

    metrics: tuple[str, ...]
    values: np.ndarray
    directions: tuple[Direction, ...]

    @classmethod
    def from_rows(cls, evaluations: Sequence[Mapping[str, float]] | Any, directions: Mapping[str, str]) -> EvalTable:
        """A table from a list of dicts or a pandas DataFrame (one row per evaluation).

        The metrics are the keys of ``directions`` (``{metric: "max" | "min"}``); other columns, e.g. a step, are
        ignored. A ``ValueError`` names the columns that have no direction when ``directions`` is empty.
        """
        if hasattr(evaluations, "to_dict") and hasattr(evaluations, "columns"):
            evaluations = evaluations.to_dict("records")
        rows = list(evaluations)
        if len(rows) < 2:
            raise ValueError(f"the evaluation table needs at least two rows to show a change, got {len(rows)}")
        if not directions:
            raise ValueError(
                f"give the direction of each evaluation metric, e.g. directions={{{next(iter(rows[0]), 'acc')!r}: "
                f"'max'}} ('max': higher is better, 'min': lower is better); the columns are {list(rows[0])}"
            )
        names = list(directions)
        missing = sorted({m for m in names for row in rows if m not in row})
        if missing:
            raise ValueError(f"metrics {missing} are missing from some evaluation rows")
        values = np.array([[float(row[m]) for m in names] for row in rows], dtype=np.float64)
        return cls(tuple(names), values, tuple(check_direction(directions[m], f"metric {m!r}") for m in names))

    def _signed(self) -> np.ndarray:
        # Flip lower-is-better metrics so that "larger is better" holds for every column.
        return self.values * np.where(np.array(self.directions) == "max", 1.0, -1.0)[None, :]

    def changes(self, pairs: Pairs = "consecutive") -> np.ndarray:
        """Relative improvement of each metric for each change, ``[changes, metrics]`` (positive: better)."""
        if pairs == "consecutive":
            index = [(k, k + 1) for k in range(len(self.values) - 1)]
        elif pairs == "all":
            index = list(combinations(range(len(self.values)), 2))
        else:
            raise ValueError(f"pairs must be 'consecutive' or 'all', got {pairs!r}")
        signed = self._signed()
        old = np.array([self.values[i] for i, _ in index])
        delta = np.array([signed[j] - signed[i] for i, j in index])
        scale = np.abs(old)
        return delta / np.where(scale > 0, scale, 1.0)

    def trade_off_share(self, tolerance: float, pairs: Pairs = "consecutive") -> float:
        """Share of changes where some metric improves by more than ``tolerance`` and another regresses by
        more than it."""
        d = self.changes(pairs)
        traded = (d > tolerance).any(1) & (d < -tolerance).any(1)
        return float(traded.mean())

    def pareto_front(self) -> list[int]:
        """Indices of the evaluations that no other evaluation dominates (at least as good on every metric,
        better on one)."""
        s = self._signed()
        geq = (s[:, None, :] >= s[None, :, :]).all(-1)
        gt = (s[:, None, :] > s[None, :, :]).any(-1)
        dominated = (geq & gt).any(0)  # row j is dominated when some row i dominates it
        return np.flatnonzero(~dominated).tolist()
