"""The JSONL sink appends one flushed line per step and continues a file on resume."""

from __future__ import annotations

import json

import torch

from gradconflict import ConflictReport, History, JSONLSink


def test_lines_are_appended_and_flushed(tmp_path):
    path = tmp_path / "deep" / "run.jsonl"
    sink = JSONLSink(path)
    sink.write(ConflictReport(("a", "b"), torch.eye(2), step=0))
    assert json.loads(path.read_text())["step"] == 0  # flushed before close
    sink.close()
    again = JSONLSink(path)  # a resumed run continues the file
    again.write(ConflictReport(("a", "b"), torch.eye(2), step=1))
    again.close()
    assert [r.step for r in History.from_jsonl(path)] == [0, 1]
    fresh = JSONLSink(path, overwrite=True)
    assert len(path.read_text().splitlines()) == 2  # opened only at its first step
    fresh.write(ConflictReport(("a", "b"), torch.eye(2), step=7))
    fresh.close()
    assert [r.step for r in History.from_jsonl(path)] == [7]
