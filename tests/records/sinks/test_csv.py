"""The CSV sink: one valid table whatever tasks the steps carry, appended on resume, numbers as measured."""

from __future__ import annotations

import csv

import pytest
import torch

from gradconflict import ConflictReport
from gradconflict.records.sinks import CSVSink
from tests.records.sinks.helpers import known_report, monitored_run


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_columns_added_later_widen_the_whole_file(tmp_path):
    path = tmp_path / "run.csv"
    sink = CSVSink(path)
    sink.write(ConflictReport(("a",), torch.tensor([[4.0]]), step=0))  # one task: no pair yet
    sink.write(known_report(step=1))  # three tasks, every pair
    sink.write(ConflictReport.skipped_step(("a", "b"), 2, "non-finite loss"))
    sink.close()
    rows = read(path)
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["norm/a"] == "2.0" and rows[0]["cos/a/b"] == "" and rows[0]["skipped"] == "0"
    assert float(rows[1]["cos/a/b"]) == pytest.approx(-1 / 3)
    assert rows[2]["skipped"] == "1" and rows[2]["skip_reason"] == "non-finite loss" and rows[2]["norm/a"] == ""
    assert not (tmp_path / "run.csv.tmp").exists()


def test_a_resumed_run_appends_under_the_same_header(tmp_path):
    path = tmp_path / "run.csv"
    first = CSVSink(path)
    first.write(known_report(step=0))
    first.close()
    header = path.read_text().splitlines()[0]
    again = CSVSink(path)
    again.write(known_report(step=1, tasks="cab"))  # another key order: the same columns
    again.close()
    lines = path.read_text().splitlines()
    assert lines[0] == header and len(lines) == 3
    assert [r["cos/a/b"] for r in read(path)][0] == [r["cos/a/b"] for r in read(path)][1]
    CSVSink(path, overwrite=True).close()
    assert path.read_text() == ""


def test_layer_columns_on_request(tmp_path):
    sink = CSVSink(tmp_path / "run.csv", layers=True)
    sink.write(known_report())
    sink.close()
    assert "layer/body.1/cos/a/b" in read(tmp_path / "run.csv")[0]


def test_a_monitored_run_writes_the_oracle_cosine_and_trains_as_the_plain_loop(tmp_path):
    expected = monitored_run(CSVSink(tmp_path / "run.csv"))
    written = [float(r["cos/a/b"]) for r in read(tmp_path / "run.csv")]
    assert written == pytest.approx(expected, rel=1e-9)
