"""The packed file beside a JSONL history: a reader that uses it gets the history the JSON gives, bit for bit,
and a packed file that is cut, corrupt, stale or missing costs speed, never a step."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from gradconflict import ConflictReport, History, JSONLSink, LayerReport
from gradconflict.records.sinks import jsonl, packed
from gradconflict.records.sinks.packed import packed_path, read_packed


def _reports(n: int = 60) -> list[ConflictReport]:
    """Every kind of step: two layouts (a task absent every 7th step, in another order), losses absent on some,
    weights on others, skipped steps, and float32 Grams (as a monitor measures them)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for s in range(n):
        tasks = ("a", "b", "c") if s % 7 else ("c", "a")
        T = len(tasks)

        def gram() -> torch.Tensor:
            J = torch.randn(T, 5, generator=generator)  # noqa: B023 (T of this step)
            return J @ J.T

        losses = torch.rand(T, generator=generator) if s % 5 else None
        weights = torch.rand(T, generator=generator) if s % 3 else None
        if s in (20, 21, 45):
            out.append(ConflictReport.skipped_step(tasks, s, "non-finite loss", losses, weights=weights))
            continue
        layers = {f"l{k}": LayerReport(f"l{k}", tasks, gram(), num_params=10 + k) for k in range(2)}
        out.append(ConflictReport(tasks, gram(), weights, losses=losses, layers=layers, step=s, threshold=-0.1))
    return out


def _write(path: Path, reports: list[ConflictReport], close: bool = True, **kwargs) -> JSONLSink:
    sink = JSONLSink(path, **kwargs)
    for report in reports:
        sink.write(report)
    if close:
        sink.close()
    return sink


def _decoded(path: Path) -> History:
    """The history from the JSON alone (the packed file moved aside, then put back)."""
    side = packed_path(path)
    aside = side.with_name("aside")
    if side.exists():
        side.rename(aside)
    try:
        return History.from_jsonl(path)
    finally:
        if aside.exists():
            aside.rename(side)


def _assert_same(mine: History, theirs: History) -> None:
    assert mine.steps_seen == theirs.steps_seen and len(mine) == len(theirs)
    for a, b in zip(mine._kept(), theirs._kept()):
        assert (a.layout, a.step, a.skip_reason) == (b.layout, b.step, b.skip_reason)
        assert torch.equal(a.packed.isnan(), b.packed.isnan())
        assert torch.equal(a.packed.nan_to_num(), b.packed.nan_to_num())
    assert mine.ema == theirs.ema and mine.gradvac_layers == theirs.gradvac_layers


@pytest.fixture
def small_frames(monkeypatch):
    monkeypatch.setattr(packed, "FRAME_ROWS", 8)


def _decoded_lines(monkeypatch) -> list[int]:
    """Counts the lines the JSON reader decodes."""
    counted: list[int] = []
    original = jsonl.json_lines

    def counting(*args, **kwargs):
        for item in original(*args, **kwargs):
            counted.append(1)
            yield item

    monkeypatch.setattr(jsonl, "json_lines", counting)
    return counted


def test_the_packed_file_gives_the_history_of_the_json(tmp_path, small_frames, monkeypatch):
    path, reports = tmp_path / "run.jsonl", _reports()
    _write(path, reports)
    assert packed_path(path).exists()
    reference = _decoded(path)
    decoded = _decoded_lines(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = History.from_jsonl(path)
    assert not decoded  # every line came from the packed file
    _assert_same(history, reference)
    # ... and against the reports as measured, not only against the other reader
    assert [r.step for r in history] == list(range(60))
    assert history.skipped_steps() == [(20, "non-finite loss"), (21, "non-finite loss"), (45, "non-finite loss")]
    for k in (0, 7, 33, 59):
        assert torch.equal(history[k].gram, reports[k].gram.double()) and history[k].tasks == reports[k].tasks
        assert torch.equal(history[k].layers["l1"].gram, reports[k].layers["l1"].gram.double())
    assert history[10].losses is None and history[3].weights.tolist() == [1.0, 1.0, 1.0]


def test_blocks_run_across_frames_of_one_layout(tmp_path, small_frames):
    path = tmp_path / "run.jsonl"
    _write(path, [ConflictReport(("a", "b"), torch.eye(2) * s, step=s) for s in range(1, 30)])
    (block,) = read_packed(path)  # four frames, one array
    assert block.steps.tolist() == list(range(1, 30)) and block.packed.shape == (29, 2 + 2 + 4)
    assert (block.start, block.end, block.lines) == (0, path.stat().st_size, 29)
    stacked = History.from_jsonl(path).stacked()[0]
    assert stacked.packed.data_ptr() == block.packed.data_ptr() or stacked.packed.shape[0] == 29


@pytest.mark.parametrize("cut", [1, 7, 100, 513, -5, -1])
def test_a_packed_file_cut_short_costs_nothing(tmp_path, small_frames, cut):
    path, reports = tmp_path / "run.jsonl", _reports()
    _write(path, reports)
    side = packed_path(path)
    data = side.read_bytes()
    side.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(History.from_jsonl(path), _decoded(path))


def test_a_corrupt_frame_is_decoded_from_the_json(tmp_path, small_frames, monkeypatch):
    path = tmp_path / "run.jsonl"
    _write(path, [ConflictReport(("a", "b"), torch.eye(2) * s, step=s) for s in range(40)])
    side = packed_path(path)
    data = bytearray(side.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte among the numbers of a middle frame
    side.write_bytes(bytes(data))
    decoded = _decoded_lines(monkeypatch)
    history = History.from_jsonl(path)
    assert [float(r.gram[1, 1]) for r in history] == [float(s) for s in range(40)]
    assert 0 < len(decoded) < 40  # the frames before it still served


def test_a_stale_packed_file_is_not_used(tmp_path, small_frames):
    path = tmp_path / "run.jsonl"
    _write(path, [ConflictReport(("a", "b"), torch.eye(2), step=s) for s in range(20)])
    stale = packed_path(path).read_bytes()
    # Another run written to the same path without a packed file: the old packed file must not speak for it.
    _write(path, [ConflictReport(("a", "b"), 2 * torch.eye(2), step=s) for s in range(20)], overwrite=True,
           packed=False)
    assert not packed_path(path).exists()
    packed_path(path).write_bytes(stale)
    assert [float(r.gram[0, 0]) for r in History.from_jsonl(path)] == [2.0] * 20
    # A JSONL edited by hand in the last line of a frame is read as edited.
    _write(path, [ConflictReport(("a", "b"), torch.eye(2), step=s) for s in range(20)], overwrite=True)
    lines = path.read_text().splitlines(keepends=True)
    lines[7] = lines[7].replace('"step": 7', '"step": 70')
    path.write_text("".join(lines))
    assert [r.step for r in History.from_jsonl(path)][6:9] == [6, 70, 8]


def test_a_run_killed_then_resumed_reads_whole(tmp_path, small_frames):
    path, reports = tmp_path / "run.jsonl", _reports()
    _write(path, reports[:30], close=False)  # killed: its last frame never written, its last line cut
    with path.open("ab") as f:
        f.write(b'{"schema": 1, "step": 30, "skip')
    with pytest.warns(RuntimeWarning, match="cut short"):
        _write(path, reports[30:])
    assert len(list(read_packed(path))) >= 2  # frames before the kill and after the resume
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = History.from_jsonl(path)
    assert [r.step for r in history] == list(range(60))
    _assert_same(history, _decoded(path))


def test_line_numbers_after_the_packed_steps(tmp_path, small_frames):
    path = tmp_path / "run.jsonl"
    _write(path, [ConflictReport(("a", "b"), torch.eye(2), step=s) for s in range(20)], close=False)
    with path.open("a") as f:  # a line cut short in the tail no frame covers: line 21
        f.write('{"schema": 1, "st\n')
    with pytest.warns(RuntimeWarning, match="line 21 is not JSON"):
        assert len(History.from_jsonl(path)) == 20


def test_the_sink_goes_on_when_the_packed_file_cannot_be_written(tmp_path):
    path = tmp_path / "run.jsonl"
    packed_path(path).mkdir()  # a folder where the packed file would go
    with pytest.warns(RuntimeWarning, match="cannot write"):
        _write(path, [ConflictReport(("a", "b"), torch.eye(2), step=s) for s in range(3)])
    assert [r.step for r in History.from_jsonl(path)] == [0, 1, 2]


def test_to_jsonl_writes_the_packed_file(tmp_path, small_frames):
    history = History()
    for report in _reports(30):
        history.append(report)
    path = history.to_jsonl(tmp_path / "out" / "run.jsonl")
    assert packed_path(path).exists()
    _assert_same(History.from_jsonl(path), _decoded(path))
    assert History().to_jsonl(path).read_text() == "" and len(History.from_jsonl(path)) == 0
    assert not packed_path(path).exists()  # the earlier history's packed file went with it


def test_attributed_steps_are_read_from_the_json_with_their_examples(tmp_path, small_frames, monkeypatch):
    from gradconflict.measure.attribution import SampleAttribution

    path = tmp_path / "run.jsonl"
    reports = []
    for s in range(30):
        report = ConflictReport(("a", "b"), torch.tensor([[1.0, -0.5], [-0.5, 1.0]]) * (s + 1), step=s)
        if s % 10 == 3:  # an attributed step among plain ones: ids 0 and 1 disagree, by construction
            within = torch.tensor([[[1.0, -0.75], [-0.75, 1.0]], [[1.0, 0.5], [0.5, 1.0]]])
            report.samples = SampleAttribution(torch.tensor([0, 1]), ("a", "b"), within, within, within.sum(0))
        reports.append(report)
    _write(path, reports)
    decoded = _decoded_lines(monkeypatch)
    history = History.from_jsonl(path)
    assert len(decoded) == 3  # the three attributed steps; the packed file served the rest
    assert [float(r.gram[0, 0]) for r in history] == [float(s + 1) for s in range(30)]
    stats = history.samples.pair("a", "b")
    assert stats[0]["count"] == stats[1]["count"] == 3 and history.samples.top("a", "b", k=1) == [0]
    assert stats[0]["push"] == pytest.approx(-1.5) and stats[1]["push"] == pytest.approx(1.0)
