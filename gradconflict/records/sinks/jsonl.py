"""The JSONL sink: one JSON line per step, appended and flushed as it is collected, so a run that crashes loses
nothing it measured. It needs nothing beyond the standard library.

Each line is the step's :meth:`~gradconflict.ConflictReport.to_dict` with the schema version in front
(``{"schema": 1, "step": ..., ...}``): the format of :meth:`gradconflict.History.to_jsonl`, which
``History.from_jsonl`` and the command line (``gradconflict report``, ``gradconflict advise``) read back.
``docs/integrations.md`` lists every field.

>>> import json, tempfile, torch
>>> from gradconflict import ConflictReport
>>> path = tempfile.mkdtemp() + "/run.jsonl"
>>> sink = JSONLSink(path)
>>> sink.write(ConflictReport(("a", "b"), torch.eye(2), step=3))
>>> sink.close()
>>> line = json.loads(open(path).readline())
>>> line["schema"], line["step"], line["cosine"]
(1, 3, [[1.0, 0.0], [0.0, 1.0]])
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from gradconflict.measure.report import ConflictReport
from gradconflict.records.history import report_line

__all__ = ["JSONLSink"]


class JSONLSink:
    """Appends each step to a JSONL file as it is collected, and flushes it.

    Args:
        path: the file (its folder is created). An existing file is appended to, so a resumed run continues it;
            ``overwrite=True`` starts it afresh.
        overwrite: truncate the file first.

    >>> import tempfile
    >>> JSONLSink(tempfile.mkdtemp() + "/runs/a.jsonl").path.name
    'a.jsonl'
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self._mode = "w" if overwrite else "a"
        self._file: TextIO | None = None  # opened at the first step: a rank that never writes never opens it

    def write(self, report: ConflictReport) -> None:
        """Append one step and flush."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open(self._mode, encoding="utf-8")
        self._file.write(report_line(report))
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"
