"""The JSONL sink appends one flushed line per step and continues a file on resume, after cutting back a line a
crash left half-written; readers skip such a line with a warning and name a line of the wrong schema."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from gradconflict import ConflictReport, History, JSONLSink, LayerReport
from gradconflict.records.history import report_line


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


def _steps(path):
    """Write steps 0..2 with a sink, as a run does."""
    sink = JSONLSink(path)
    for s in range(3):
        sink.write(ConflictReport(("a", "b"), torch.tensor([[1.0, -0.5], [-0.5, 2.0]]), step=s))
    sink.close()


def test_a_resumed_sink_truncates_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "run.jsonl"
    _steps(path)
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    for cut in (1, len(lines[2]) // 2, len(lines[2]) - 1):  # a few bytes in, half-way, all but the newline
        path.write_bytes(b"".join(lines[:2]) + lines[2][:cut])  # the file a kill during step 2's write leaves
        with pytest.warns(RuntimeWarning, match=rf"cut short.*dropping {cut} bytes"):
            resumed = JSONLSink(path)
            resumed.write(ConflictReport(("a", "b"), torch.eye(2), step=3))
        resumed.close()
        assert path.read_bytes().startswith(b"".join(lines[:2]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing left to skip
            assert [r.step for r in History.from_jsonl(path)] == [0, 1, 3]
    path.write_bytes(whole)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole file is appended to as it is
        again = JSONLSink(path)
        again.write(ConflictReport(("a", "b"), torch.eye(2), step=3))
        again.close()
    assert path.read_bytes().startswith(whole) and len(path.read_bytes().splitlines()) == 4
    path.write_bytes(lines[0][:10])  # a run killed during its first line: nothing complete is left
    with pytest.warns(RuntimeWarning, match="dropping 10 bytes"):
        JSONLSink(path).write(ConflictReport(("a", "b"), torch.eye(2), step=0))
    assert [r.step for r in History.from_jsonl(path)] == [0]


def test_a_process_killed_mid_line_then_resumed_loses_only_that_line(tmp_path):
    path = tmp_path / "run.jsonl"
    # The child writes two whole steps with a sink, then the first half of a third line as the kill finds it, and
    # waits to be killed: the kill lands mid-line every time.
    child = textwrap.dedent(
        f"""
        import sys, time, torch
        from gradconflict import ConflictReport, JSONLSink
        from gradconflict.records.history import report_line
        sink = JSONLSink({str(path)!r})
        for s in range(2):
            sink.write(ConflictReport(("a", "b"), torch.eye(2), step=s))
        line = report_line(ConflictReport(("a", "b"), torch.eye(2), step=2))
        with open({str(path)!r}, "a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
        print("mid-line", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mid-line"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not path.read_text().endswith("\n")
    with pytest.warns(RuntimeWarning, match="line 3 is not JSON"):  # read as it was left: the cut line skipped
        assert [r.step for r in History.from_jsonl(path)] == [0, 1]
    with pytest.warns(RuntimeWarning, match="cut short"):  # the resume docs/monitor.md shows: a sink on the same file
        resumed = JSONLSink(path)
        resumed.write(ConflictReport(("a", "b"), torch.eye(2), step=2))
    resumed.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.step for r in History.from_jsonl(path)] == [0, 1, 2]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(layers=[1, 2]), "'layers' must be an object"),
        (lambda d: d.update(gram=[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), "'gram' must be a 2 x 2 matrix"),
        (lambda d: d["layers"]["l"].update(gram=[[1.0]]), "the 'gram' of layer 'l' must be a 2 x 2 matrix"),
        (lambda d: d.update(weights=[1.0]), "'weights' must be a list of 2 numbers"),
        (lambda d: d.update(losses=[0.5]), "'losses' must be a list of 2 numbers"),
        (lambda d: d.update(tasks="ab"), "'tasks' must be a non-empty list of names"),
        (lambda d: d.update(step="3"), "'step' must be an integer"),
    ],
)
def test_a_line_of_the_wrong_schema_is_named_not_a_traceback(tmp_path, change, field):
    path = tmp_path / "run.jsonl"
    layer = LayerReport("l", ("a", "b"), torch.eye(2), num_params=4)
    good = report_line(ConflictReport(("a", "b"), torch.eye(2), losses=torch.ones(2), layers={"l": layer}, step=0))
    data = json.loads(good)
    change(data)
    path.write_text(good + json.dumps(data) + "\n")
    with pytest.raises(ValueError, match=rf"run.jsonl:2 is not a gradconflict history line: {re.escape(field)}"):
        History.from_jsonl(path)


def test_a_number_that_is_not_a_number_is_named(tmp_path):
    path = tmp_path / "run.jsonl"
    good = report_line(ConflictReport(("a", "b"), torch.eye(2), step=0))
    data = json.loads(good)
    data["gram"][0][1] = "x"
    path.write_text(good + json.dumps(data) + "\n")
    with pytest.raises(ValueError, match=r"run.jsonl:2 is not a gradconflict history line: TypeError"):
        History.from_jsonl(path)
