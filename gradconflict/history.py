"""The run's memory: one compact :class:`~gradconflict.ConflictReport` per measured step, plus running EMAs.

A report holds only T x T Grams (one per layer) and T losses, so keeping every step is cheap. Appending does
no work at all: the EMAs are folded in when first read, with tensor operations on the model's device.

>>> import torch
>>> from gradconflict import ConflictReport
>>> h = History(ema_decay=0.5)
>>> for s, c in enumerate([1.0, -1.0]):
...     h.append(ConflictReport(("a", "b"), torch.tensor([[1.0, c], [c, 1.0]]), step=s))
>>> len(h), round(float(h.ema["conflict_fraction"]), 3)
(2, 0.5)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradconflict.report import ConflictReport

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["History"]

def worst_cosine(report: ConflictReport) -> Tensor:
    """The most negative pairwise cosine of a report (1 when there is a single task)."""
    T = len(report.tasks)
    if T < 2:
        return torch.ones((), dtype=report.gram.dtype, device=report.gram.device)
    iu = torch.triu_indices(T, T, 1, device=report.gram.device)
    return report.cosine[iu[0], iu[1]].min()


#: The quantities whose exponential moving average is kept, each a function of a report.
EMA_QUANTITIES: dict[str, Callable[[ConflictReport], Tensor]] = {
    "conflict_fraction": lambda r: r.conflict_fraction,
    "cancellation": lambda r: r.cancellation,
    "worst_cosine": worst_cosine,
    "update_norm": lambda r: r.update_norm,
}


class History:
    """Every measured step's report, in order, with exponential moving averages of the main quantities.

    Args:
        ema_decay: weight of the past in each EMA (``ema = decay * ema + (1 - decay) * value``).
        maxlen: keep at most this many reports (the oldest are dropped); ``None`` keeps all.
    """

    def __init__(self, ema_decay: float = 0.9, maxlen: int | None = None) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.maxlen = maxlen
        self.reports: list[ConflictReport] = []
        self._ema: dict[str, Tensor] = {}
        self._unfolded: list[ConflictReport] = []

    def append(self, report: ConflictReport) -> None:
        """Add one step's report (skipped steps are kept but leave the EMAs alone)."""
        self.reports.append(report)
        if self.maxlen is not None and len(self.reports) > self.maxlen:
            del self.reports[0]
        if not report.skipped:
            self._unfolded.append(report)

    @property
    def ema(self) -> dict[str, Tensor]:
        """Exponential moving average of each of :data:`EMA_QUANTITIES` over the measured steps so far."""
        for report in self._unfolded:
            for key, quantity in EMA_QUANTITIES.items():
                value = quantity(report)
                old = self._ema.get(key)
                self._ema[key] = value if old is None else torch.lerp(value, old, self.ema_decay)
        self._unfolded.clear()
        return dict(self._ema)

    def reset(self) -> None:
        """Forget every report and EMA."""
        self.reports.clear()
        self._ema.clear()
        self._unfolded.clear()

    def __len__(self) -> int:
        return len(self.reports)

    def __iter__(self) -> Iterator[ConflictReport]:
        return iter(self.reports)

    def __getitem__(self, index: int) -> ConflictReport:
        return self.reports[index]

    @property
    def measured(self) -> list[ConflictReport]:
        """The reports of the steps that were measured (not skipped)."""
        return [r for r in self.reports if not r.skipped]

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per step: step, skipped, losses, the scalar metrics, and each pair's cosine."""
        rows = []
        for r in self.reports:
            row: dict[str, Any] = {"step": r.step, "skipped": r.skipped}
            if r.losses is not None:
                row.update({f"loss/{t}": float(v) for t, v in zip(r.tasks, r.losses.tolist())})
            if not r.skipped:
                row.update(
                    conflict_fraction=float(r.conflict_fraction),
                    cancellation=float(r.cancellation),
                    update_norm=float(r.update_norm),
                    worst_cosine=float(worst_cosine(r)),
                    condition_number=float(r.condition_number),
                )
                row.update({f"alignment/{t}": v for t, v in zip(r.tasks, r.alignment.tolist())})
                C = r.cosine.tolist()
                for i, a in enumerate(r.tasks):
                    for j in range(i + 1, len(r.tasks)):
                        row[f"cosine/{a}/{r.tasks[j]}"] = C[i][j]
            rows.append(row)
        return rows

    def to_dataframe(self) -> pd.DataFrame:
        """The :meth:`rows` as a pandas DataFrame indexed by step (needs ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("History.to_dataframe() needs pandas: pip install 'gradconflict[pandas]'") from err
        return pd.DataFrame(self.rows()).set_index("step")

    def to_jsonl(self, path: str | Path) -> Path:
        """Write one JSON object per step (``ConflictReport.to_dict()``, layers included); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for r in self.reports:
                f.write(json.dumps(r.to_dict()) + "\n")
        return path

    @classmethod
    def from_jsonl(cls, path: str | Path, ema_decay: float = 0.9) -> History:
        """Read a history written by :meth:`to_jsonl` (the EMAs are recomputed)."""
        history = cls(ema_decay=ema_decay)
        with Path(path).open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    history.append(ConflictReport.from_dict(json.loads(line)))
                except (KeyError, ValueError, TypeError) as err:
                    raise ValueError(
                        f"{path}:{number} is not a gradconflict history line ({err}); "
                        "write histories with History.to_jsonl()"
                    ) from err
        return history
