"""The CSV sink: one row per step, the columns of :func:`~gradconflict.records.sinks.scalars.scalars`, for a spreadsheet
or ``pandas.read_csv``. It needs nothing beyond the standard library.

The columns are ``step``, ``skipped``, ``skip_reason`` and then every scalar key in order of first appearance. A
step may bring a column the file does not have yet (a task that joins later, a pair first measured together): the
file is then rewritten once with the wider header (into a temporary file, moved into place), so it is always one
valid table; a cell a step has no value for is empty. Each row is flushed as it is written.

>>> import csv, tempfile, torch
>>> from gradconflict import ConflictReport
>>> path = tempfile.mkdtemp() + "/run.csv"
>>> sink = CSVSink(path)
>>> sink.write(ConflictReport(("a",), torch.ones(1, 1), step=0))                      # one task: no pair
>>> sink.write(ConflictReport(("a", "b"), torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), step=1))
>>> sink.close()
>>> with open(path, newline="") as f:
...     rows = list(csv.DictReader(f))
>>> [(r["step"], r["cos/a/b"]) for r in rows]
[('0', ''), ('1', '-0.5')]
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from gradconflict.measure.report import ConflictReport
from gradconflict.records.sinks.scalars import scalars

__all__ = ["CSVSink"]

#: The columns every row has, before the scalars.
LEADING = ("step", "skipped", "skip_reason")


class CSVSink:
    """Writes each step as a CSV row as it is collected, and flushes it.

    Args:
        path: the file (its folder is created). An existing file is appended to (a resumed run continues it,
            under its header); ``overwrite=True`` starts it afresh.
        layers: add each shared layer's columns (``layer/<name>/...``).
        overwrite: truncate the file first.

    >>> import tempfile
    >>> CSVSink(tempfile.mkdtemp() + "/runs/a.csv", layers=True).layers
    True
    """

    def __init__(self, path: str | Path, *, layers: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.layers = layers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = []
        if not overwrite and self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), [])
        self._file = self.path.open("a" if self.columns else "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, self.columns)

    def write(self, report: ConflictReport) -> None:
        """Append one row (rewriting the file first when the step brings new columns) and flush."""
        row: dict[str, Any] = {"step": report.step, "skipped": int(report.skipped), "skip_reason": report.skip_reason}
        row.update(scalars(report, layers=self.layers))
        known = set(self.columns)
        new = [k for k in (*LEADING, *row) if k not in known]
        if new:
            self._widen(self.columns + new)
        self._writer.writerow(row)
        self._file.flush()

    def _widen(self, columns: list[str]) -> None:
        """Rewrite the file with ``columns`` as its header (old rows keep their cells; new columns are empty)."""
        self._file.close()
        rows: list[dict[str, str]] = []
        if self.columns:
            with self.path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.path)
        self.columns = columns
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, self.columns)

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r})"
