"""The run summary: each number recomputed from the reports' Grams with the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradconflict import ConflictReport
from gradconflict.reporting.summary import summarize_run
from tests.runs import drawn_run, pair_values


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_pairs_are_taken_over_the_steps_that_carried_both(kind):
    history = drawn_run(kind)
    summary = summarize_run(history)
    for pair in summary.pairs:
        a, b = pair.tasks
        assert pair.name == f"{a}/{b}"  # ordinary names: the pair key, readable
        steps, values = pair_values(history, a, b)
        assert pair.together == len(steps)
        assert pair.mean_cosine == pytest.approx(np.mean(values), rel=1e-9)
        assert pair.persistence == pytest.approx(np.mean(np.array(values) < 0), rel=1e-12)
        last = values[len(values) - max(1, len(values) // 4):]
        assert pair.last_cosine == pytest.approx(np.mean(last), rel=1e-9)


def test_tasks_norms_and_alignment_follow_the_definitions():
    history = drawn_run("partial")
    summary = summarize_run(history)
    norms = {t: [] for t in "abc"}
    alignment = {t: [] for t in "abc"}
    for r in history.measured:
        G, w = r.gram.double().numpy(), r.weights.double().numpy()
        update = math.sqrt(w @ G @ w)
        for k, t in enumerate(r.tasks):
            norms[t].append(math.sqrt(G[k, k]))
            alignment[t].append((G @ w)[k] / (math.sqrt(G[k, k]) * update))  # cos(g_t, sum_i w_i g_i)
    for row in summary.task_rows:
        assert row.steps == len(norms[row.name])
        assert row.mean_norm == pytest.approx(np.mean(norms[row.name]), rel=1e-9)
        assert row.mean_alignment == pytest.approx(np.mean(alignment[row.name]), rel=1e-9)
        assert row.against == pytest.approx(np.mean(np.array(alignment[row.name]) < 0))
    assert summary.task_steps == (40, 40, 8) and summary.steps_with_pairs == 40 and summary.partial


def test_counts_skips_and_the_profile():
    history = drawn_run("full", steps=12)
    history.append(ConflictReport.skipped_step(("a", "b"), 12, "non-finite loss"))
    summary = summarize_run(history)
    assert (summary.steps, summary.measured, summary.skipped) == (13, 12, {"non-finite loss": 1})
    assert (summary.first_step, summary.last_step) == (0, 11) and not summary.partial
    assert summary.profile is not None and summary.profile.branch_point == "enc.layer.2"  # conflict from there up
    text = summary.text()
    assert text.startswith("13 steps (12 measured, 1 skipped: 1 non-finite loss), steps 0 to 11")
    assert "branch point: enc.layer.2" in text and "tasks (measured" not in text


def test_a_history_is_read_without_a_report_per_step(monkeypatch):
    history = drawn_run("full", steps=12)
    history.append(ConflictReport.skipped_step(("a", "b"), 12, "non-finite loss"))
    expected = summarize_run(list(history))
    monkeypatch.setattr(type(history), "reports", property(lambda self: pytest.fail("a report was built per step")))
    summary = summarize_run(history)
    assert (summary.steps, summary.skipped) == (13, {"non-finite loss": 1})
    assert summary.pairs == expected.pairs and summary.task_rows == expected.task_rows
    assert summary.text() == expected.text()


def test_a_round_robin_run_says_nothing_about_pairs():
    summary = summarize_run(drawn_run("round_robin", steps=9))
    assert summary.steps_with_pairs == 0 and summary.quantities == {} and summary.no_pair is not None
    assert all(p.together == 0 and math.isnan(p.mean_cosine) for p in summary.pairs)
    assert f"warning: {summary.no_pair}" in summary.text().splitlines()


def test_no_measured_step_is_an_error():
    with pytest.raises(ValueError, match="no measured step"):
        summarize_run([ConflictReport.skipped_step("ab", 0, "non-finite loss", losses=torch.ones(2))])


def test_a_history_that_dropped_steps_says_so_and_a_file_keeps_every_step(tmp_path):
    from gradconflict import History, JSONLSink

    path = tmp_path / "run.jsonl"
    history = History(max_history=5, sinks=[JSONLSink(path)])
    for report in drawn_run("full", steps=12):
        history.append(report)
    history.close()
    kept = summarize_run(history)
    assert (kept.steps, kept.earlier, kept.first_step) == (5, 7, 7)
    assert len(kept.coverage()) == 1  # the one line saying these are the last 5 steps of 12
    whole = summarize_run(History.from_jsonl(path))  # what gradconflict report reads: every line of the file
    assert (whole.steps, whole.earlier, whole.first_step, whole.last_step) == (12, 0, 0, 11)
    assert whole.coverage() == []


def test_a_long_run_trend_is_fitted_on_bin_means_and_the_summary_says_how_many():
    from gradconflict import History
    from gradconflict.diagnosis.trends import TREND_POINTS

    history = History(max_history=None)
    for s in range(TREND_POINTS + 500):
        c = 0.5 - s / (TREND_POINTS + 500)
        history.append(ConflictReport(("a", "b"), torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64), step=s))
    trend = summarize_run(history).quantities["worst_cosine"].trend
    assert (trend.n, trend.steps) == (TREND_POINTS, TREND_POINTS + 500) and trend.slope < 0
