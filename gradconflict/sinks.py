"""Sinks: where each measured step goes as soon as it is collected, besides the in-memory history.

:class:`JSONLSink` appends one JSON line per step (the schema of :meth:`gradconflict.History.to_jsonl`) and
flushes it, so a run that crashes loses nothing it measured; ``History.from_jsonl`` and the command line read
the file back.

>>> import json, tempfile, torch
>>> from gradconflict import ConflictReport
>>> path = tempfile.mkdtemp() + "/run.jsonl"
>>> sink = JSONLSink(path)
>>> sink.write(ConflictReport(("a", "b"), torch.eye(2), step=3))
>>> sink.close()
>>> json.loads(open(path).readline())["step"]
3
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from gradconflict.history import report_line
from gradconflict.report import ConflictReport

__all__ = ["JSONLSink"]


class JSONLSink:
    """Appends each step to a JSONL file as it is measured, and flushes it.

    Args:
        path: the file (its folder is created). An existing file is appended to, so a resumed run continues it;
            ``overwrite=True`` starts it afresh.
        overwrite: truncate the file first.
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
