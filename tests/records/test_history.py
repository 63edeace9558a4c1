"""History: compact host records, bounded length, moving averages folded in on append over every step, tasks by
name, non-finite steps kept out of the averages, sinks that fail never stop training, JSONL round trips."""

from __future__ import annotations

import math

import pytest
import torch

from gradconflict import ConflictReport, History, LayerReport


def report(step: int, cos: float, tasks=("a", "b"), layers: int = 0, scale: float = 1.0) -> ConflictReport:
    G = torch.tensor([[1.0, cos], [cos, 1.0]]) * scale
    ls = {f"l{k}": LayerReport(f"l{k}", tasks, G / max(layers, 1), num_params=3) for k in range(layers)}
    return ConflictReport(tasks, G, losses=torch.tensor([0.5, 2.0]), layers=ls, step=step)


def test_records_live_on_the_host_in_one_packed_tensor():
    history = History()
    history.append(report(0, -0.5, layers=3))
    (record,) = history._kept()
    T, L = 2, 3
    assert record.packed.device.type == "cpu" and record.packed.numel() == 2 * T + (L + 1) * T * T
    again = history[0]
    assert again.tasks == ("a", "b") and set(again.layers) == {"l0", "l1", "l2"}
    torch.testing.assert_close(again.gram, report(0, -0.5).gram)
    torch.testing.assert_close(again.losses, torch.tensor([0.5, 2.0]))


def test_bounded_history_keeps_the_last_steps_and_averages_over_all():
    history = History(ema_decay=0.5, max_history=3)
    cosines = [0.9, -0.1, 0.3, -0.7, 0.5]
    for s, c in enumerate(cosines):
        history.append(report(s, c))
    assert [r.step for r in history] == [2, 3, 4] and history.steps_seen == 5
    ema = cosines[0]
    for c in cosines[1:]:
        ema = 0.5 * ema + 0.5 * c
    assert history.ema["cosine/a/b"] == pytest.approx(ema)
    assert history.ema["worst_cosine"] == pytest.approx(ema)


def test_pairs_are_keyed_by_name_whatever_the_order_and_subset():
    history = History(ema_decay=0.0)  # the EMA is the last value
    history.append(report(0, 0.25, tasks=("b", "a")))
    history.append(ConflictReport(("c",), torch.ones(1, 1), step=1))  # one task: no pair, no conflict fraction
    assert history.ema["cosine/a/b"] == pytest.approx(0.25)
    assert history.ema["conflict_fraction"] == 0.0
    assert history.tasks == ["b", "a", "c"]


def test_a_non_finite_gram_is_recorded_as_skipped_and_stays_out_of_the_averages():
    history = History(ema_decay=0.5)
    history.append(report(0, 0.5))
    history.append(ConflictReport(("a", "b"), torch.tensor([[math.inf, 0.0], [0.0, 1.0]]), step=1))
    assert history[1].skipped and "non-finite" in history[1].skip_reason
    assert history.ema["cosine/a/b"] == pytest.approx(0.5)


class Broken:
    def write(self, report):
        raise OSError("disk full")

    def close(self):
        pass


def test_a_failing_sink_warns_once_and_is_dropped():
    history = History(sinks=[Broken()])
    with pytest.warns(RuntimeWarning, match="disk full"):
        history.append(report(0, 0.1))
    history.append(report(1, 0.1))  # no second warning, the run goes on
    assert len(history) == 2 and history.sinks == []


class Recording:
    def __init__(self):
        self.reports, self.closed = [], False

    def write(self, report):
        self.reports.append(report)

    def close(self):
        self.closed = True


class FailsToClose(Recording):
    def close(self):
        raise OSError("disk gone")


def test_every_sink_gets_the_same_host_side_report_and_a_failing_close_only_warns():
    first, second, last = Recording(), FailsToClose(), Recording()
    history = History(sinks=[first, second, last])
    history.append(report(0, -0.5))
    assert first.reports[0] is second.reports[0] is last.reports[0]  # built once, its metrics computed once
    assert first.reports[0].gram.device.type == "cpu"
    with pytest.warns(RuntimeWarning, match="failed to close: disk gone"):
        history.close()
    assert first.closed and last.closed


def test_jsonl_round_trip_a_cut_line_is_skipped_and_a_foreign_line_is_named(tmp_path):
    history = History()
    for s in range(3):
        history.append(report(s, -0.2 * s, layers=2))
    path = history.to_jsonl(tmp_path / "run.jsonl")
    loaded = History.from_jsonl(path)
    assert len(loaded) == 3 and [r.step for r in loaded] == [0, 1, 2]
    for a, b in zip(loaded, history):
        torch.testing.assert_close(a.layers["l1"].gram, b.layers["l1"].gram.double())
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:50], lines[2]]) + "\n")  # a line cut short, in mid-file
    with pytest.warns(RuntimeWarning, match=r"line 2 is not JSON"):
        assert [r.step for r in History.from_jsonl(path)] == [0, 2]
    path.write_text("\n".join([lines[0], '{"step": 1}', lines[2]]) + "\n")  # JSON, but not a history step
    with pytest.raises(ValueError, match=r"run.jsonl:2 is not a gradconflict history line: 'tasks'"):
        History.from_jsonl(path)
    path.write_text(lines[0] + "\n" + lines[1].replace('"schema": 2', '"schema": 99') + "\n")
    with pytest.raises(ValueError, match=r"run.jsonl:2 was written with history schema 99.*upgrade gradconflict"):
        History.from_jsonl(path)


def test_state_dict_round_trip():
    history = History(ema_decay=0.7, max_history=10)
    for s in range(4):
        history.append(report(s, 0.3 - 0.2 * s, layers=1))
    state = history.state_dict()
    again = History()
    again.load_state_dict(state)
    assert again.ema == history.ema and again.max_history == 10 and again.steps_seen == 4
    assert [r.to_dict() for r in again] == [r.to_dict() for r in history]
    with pytest.raises(ValueError, match="schema"):
        again.load_state_dict({"schema": 99})


def test_gradvac_ema_per_pair_and_per_layer_starts_at_zero():
    # GradVac (Wang et al., ICLR 2021, Sec. 3.2, Eq. 3): phi <- (1 - beta) phi + beta cos, phi(0) = 0. By hand with
    # beta = 0.01 and the cosines 0.5, -0.5, 1.0: 0.005, then 0.99 * 0.005 - 0.005, then 0.99 * that + 0.01.
    history = History(gradvac_beta=0.01)
    for s, c in enumerate([0.5, -0.5, 1.0]):
        history.append(report(s, c, layers=2))
    phi = 0.0
    for c in [0.5, -0.5, 1.0]:
        phi = 0.99 * phi + 0.01 * c
    assert phi == pytest.approx(0.0099505)
    assert history.gradvac == {"a/b": pytest.approx(phi)}
    assert history.gradvac_layers == {"l0": {"a/b": pytest.approx(phi)}, "l1": {"a/b": pytest.approx(phi)}}
    # A pair first measured later starts from 0 too; the order of the tasks in a step does not matter.
    history.append(report(3, -1.0, tasks=("c", "a")))
    assert history.gradvac["a/c"] == pytest.approx(-0.01) and history.gradvac["a/b"] == pytest.approx(phi)


def test_gradvac_ema_folded_in_batches_equals_step_by_step_and_survives_a_resume():
    cosines = [0.3 * ((-1) ** s) + 0.1 * s / 100 for s in range(150)]  # more than one batch of folded steps
    history = History(gradvac_beta=0.5)
    for s, c in enumerate(cosines):
        history.append(report(s, c))
    phi = 0.0
    for c in cosines:
        phi = 0.5 * phi + 0.5 * c
    assert history.gradvac["a/b"] == pytest.approx(phi)
    again = History()
    again.load_state_dict(history.state_dict())
    assert again.gradvac == history.gradvac and again.gradvac_beta == 0.5
    with pytest.raises(ValueError, match="gradvac_beta"):
        History(gradvac_beta=0.0)


def test_stacked_gives_the_kept_measured_steps_per_layout():
    history = History()
    history.append(report(0, 0.5, layers=2))
    history.append(report(1, -0.5, tasks=("b", "a"), layers=2))
    history.append(ConflictReport(("a", "b"), torch.tensor([[math.inf, 0.0], [0.0, 1.0]]), step=2))  # skipped
    history.append(report(3, 0.25, layers=2))
    blocks = history.stacked()
    assert [(b.tasks, b.steps.tolist()) for b in blocks] == [(("a", "b"), [0, 3]), (("b", "a"), [1])]
    first = blocks[0]
    assert first.layers == (("l0", 3), ("l1", 3)) and first.has_losses and first.threshold == 0.0
    T = 2
    for row, step in zip(first.packed, first.steps.tolist()):
        rebuilt = history[[r.step for r in history].index(step)]
        torch.testing.assert_close(row[2 * T : 2 * T + T * T].reshape(T, T), rebuilt.gram)
        torch.testing.assert_close(row[2 * T + T * T :].reshape(2, T, T)[1], rebuilt.layers["l1"].gram)
        torch.testing.assert_close(row[T : 2 * T], rebuilt.losses)


def test_layer_order_is_the_steps_order_bottom_to_top_and_a_saved_run_keeps_it(tmp_path):
    def step(s: int, names: list[str]) -> ConflictReport:
        layers = {n: LayerReport(n, ("a", "b"), torch.eye(2), num_params=2) for n in names}
        return ConflictReport(("a", "b"), len(names) * torch.eye(2), layers=layers, step=s)

    history = History()
    history.append(step(0, ["stem", "neck"]))  # names that sort against their depth
    history.append(step(1, ["stem", "body", "neck"]))  # a layer that joins later goes where its step puts it
    history.append(ConflictReport.skipped_step(("a", "b"), 2, "non-finite loss"))
    assert history.layer_order == ["stem", "body", "neck"]
    assert History.from_jsonl(history.to_jsonl(tmp_path / "run.jsonl")).layer_order == ["stem", "body", "neck"]
