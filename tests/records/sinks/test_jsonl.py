"""The JSONL sink appends one flushed line per step and continues a file on resume, after cutting back a line a
crash left half-written; readers skip such a line with a warning and name a line of the wrong schema."""

from __future__ import annotations

import json
import math
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


def _mixed_run() -> list[str]:
    """Lines of a run with every kind of step: layers, a task absent on some steps (other layouts), losses
    absent or partly null, weights absent, a skipped step, a step whose Gram is not finite, another route."""
    generator = torch.Generator().manual_seed(0)

    def gram(T: int) -> torch.Tensor:
        J = torch.randn(T, 5, generator=generator, dtype=torch.float64)
        return J @ J.T

    lines = []
    for s in range(150):
        tasks = ("a", "b", "c") if s % 7 else ("c", "a")  # c and a only, in another order, every 7th step
        T = len(tasks)
        layers = {
            f"l{k}": LayerReport(f"l{k}", tasks, gram(T), num_params=10 + k, route="dense" if k else "tapped")
            for k in range(2 if s < 100 else 3)
        }
        losses = torch.rand(T, generator=generator, dtype=torch.float64) if s % 5 else None
        weights = torch.rand(T, generator=generator, dtype=torch.float64) if s % 3 else None
        if s in (40, 41, 90):
            report = ConflictReport.skipped_step(tasks, s, "non-finite loss", losses, weights=weights)
        else:
            report = ConflictReport(tasks, gram(T), weights, losses=losses, layers=layers, step=s, threshold=-0.1)
        line = json.loads(report_line(report))
        if s == 60:
            line["gram"][0][1] = float("nan")  # json reads NaN: a step whose Gram is not finite
        if s == 61 and line.get("losses"):
            line["losses"][0] = None  # a loss that was not finite
        if s == 62:
            line.pop("weights")
        lines.append(json.dumps(line) + "\n")
    return lines


@pytest.mark.parametrize("rows", [1, 16, 4096])
def test_the_block_reader_gives_the_history_of_the_line_reader(tmp_path, monkeypatch, rows):
    from gradconflict.records.sinks import jsonl

    path = tmp_path / "run.jsonl"
    lines = _mixed_run()
    lines.insert(30, lines[30][:70] + "\n")  # a line cut short in mid-file (then written again whole)
    path.write_text("".join(lines))
    monkeypatch.setattr(jsonl, "BLOCK_ROWS", rows)
    with pytest.warns(RuntimeWarning, match="line 31 is not JSON"):
        columnar = History.from_jsonl(path, ema_decay=0.8, max_history=120)
    line_by_line = History(ema_decay=0.8, max_history=120)
    with pytest.warns(RuntimeWarning, match="line 31 is not JSON"):
        for report in jsonl.read_reports(path):
            line_by_line.append(report)
    assert len(columnar) == len(line_by_line) == 120 and columnar.steps_seen == line_by_line.steps_seen == 150
    for mine, theirs in zip(columnar._kept(), line_by_line._kept()):
        assert (mine.layout, mine.step, mine.skip_reason) == (theirs.layout, theirs.step, theirs.skip_reason)
        assert mine.packed.dtype == theirs.packed.dtype == torch.float64
        assert torch.equal(mine.packed.isnan(), theirs.packed.isnan())
        assert torch.equal(mine.packed.nan_to_num(), theirs.packed.nan_to_num())
    # the reader folds the averages in larger batches than appending: equal to rounding
    assert columnar.ema == pytest.approx(line_by_line.ema, rel=1e-12, abs=1e-15)
    assert columnar.gradvac_layers.keys() == line_by_line.gradvac_layers.keys()
    for layer, phi in columnar.gradvac_layers.items():
        assert phi == pytest.approx(line_by_line.gradvac_layers[layer], rel=1e-12, abs=1e-15)
    assert columnar.skipped_steps() == [(40, "non-finite loss"), (41, "non-finite loss"), (60, "non-finite gradients"),
                                        (90, "non-finite loss")]
    kept = list(columnar)
    assert [r.step for r in kept[:3]] == [30, 31, 32]  # the last 120 of the 150 whole lines
    assert kept[5].step == 35 and kept[5].tasks == ("c", "a")


def test_the_block_reader_keeps_the_numbers_written(tmp_path):
    # Against the reports as written, not against another reader: every kept number and field comes back.
    path = tmp_path / "run.jsonl"
    path.write_text("".join(_mixed_run()))
    history = History.from_jsonl(path)
    written = [ConflictReport.from_dict(json.loads(line)) for line in _mixed_run()]
    assert [r.step for r in history] == list(range(150))
    r, w = history[99], written[99]
    assert (r.tasks, list(r.layers), r.threshold) == (w.tasks, ["l0", "l1"], -0.1)
    assert [(x.num_params, x.route) for x in r.layers.values()] == [(10, "tapped"), (11, "dense")]
    assert torch.equal(r.gram, w.gram) and torch.equal(r.layers["l1"].gram, w.layers["l1"].gram)
    assert torch.equal(r.weights, w.weights) and torch.equal(r.losses, w.losses)
    assert history[62].weights.tolist() == [1.0, 1.0, 1.0] and history[10].losses is None
    assert math.isnan(history[61].losses[0]) and history[61].losses[1] == written[61].losses[1]


def test_the_first_bad_line_of_a_block_is_the_one_named(tmp_path):
    path = tmp_path / "run.jsonl"
    good = report_line(ConflictReport(("a", "b"), torch.eye(2), step=0))
    wrong_number, wrong_field = json.loads(good), json.loads(good)
    wrong_number["gram"][0][1] = "x"
    wrong_field["tasks"] = "ab"
    path.write_text(good + good + json.dumps(wrong_number) + "\n" + good + json.dumps(wrong_field) + "\n")
    with pytest.raises(ValueError, match=r"run.jsonl:3 is not a gradconflict history line: TypeError"):
        History.from_jsonl(path)


def test_a_line_keeps_its_layers_bottom_to_top_and_a_line_of_schema_1_is_read_in_natural_order(tmp_path):
    from gradconflict.records.sinks import jsonl

    # Listed bottom to top, in an order that no sort of the names gives; each layer's numbers tell it apart.
    names = ["stem", "block.10", "block.2"]
    layers = {n: LayerReport(n, "ab", (k + 1) * torch.eye(2), num_params=k + 1) for k, n in enumerate(names)}
    line = json.loads(report_line(ConflictReport("ab", 6 * torch.eye(2), layers=layers, step=0)))
    assert line["schema"] == 2 and list(line["layers"]) == names
    # A line written before the layers were kept in the model's order listed them as the backward reached them;
    # it is read in natural order of the names, as it was read then.
    old = {**line, "schema": 1, "step": 1}
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(old) + "\n")
    for new, legacy in (list(History.from_jsonl(path)), list(jsonl.read_reports(path))):
        assert list(new.layers) == names
        assert list(legacy.layers) == ["block.2", "block.10", "stem"]
        for k, name in enumerate(names):  # the numbers move with their names
            assert legacy.layers[name].num_params == k + 1
            assert torch.equal(legacy.layers[name].gram.float(), (k + 1) * torch.eye(2))
