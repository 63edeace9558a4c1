"""The figures draw the numbers of the reports: each series recomputed from the Grams with the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from gradconflict.diagnosis import align, layer_profile
from gradconflict.reporting import plots
from gradconflict.reporting.plots import NO_PAIR
from tests.runs import LAYERS, cosine, drawn_run, pair_values


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_pair_cosines_draw_each_pair_on_the_steps_that_carried_both():
    history = drawn_run("partial", steps=40)
    fig = plots.pair_cosines(align(history))
    lines = fig.axes[0].lines
    for line, (a, b) in zip(lines, [("a", "b"), ("a", "c"), ("b", "c")]):
        steps, values = pair_values(history, a, b)
        assert line.get_xdata().tolist() == steps
        assert line.get_ydata() == pytest.approx(values, rel=1e-9)
    assert list(lines[3].get_ydata()) == [0.0, 0.0]  # the threshold line, S = 0


def test_long_runs_add_a_moving_mean_over_the_raw_values():
    history = drawn_run("full", steps=90, layers=False)
    ax = plots.pair_cosines(align(history)).axes[0]
    steps, values = pair_values(history, "a", "b")
    raw, smooth = ax.lines[0], ax.lines[1]
    assert raw.get_ydata() == pytest.approx(values) and smooth.get_label() == "a/b (moving mean)"
    width = (steps[-1] - steps[0] + 1) // 30  # 3 steps: the mean of each value and the two before it
    assert smooth.get_ydata()[10] == pytest.approx(np.mean(values[10 - width + 1 : 11]))


def test_very_long_runs_draw_each_bins_range_and_the_moving_mean(monkeypatch):
    # Beyond MAX_STEPS steps a series is drawn as the range of its values in MAX_POINTS bins of steps (the
    # figure would otherwise hold every point): 90 steps in 9 bins of 10 here.
    monkeypatch.setattr(plots, "MAX_STEPS", 50)
    monkeypatch.setattr(plots, "MAX_POINTS", 9)
    history = drawn_run("full", steps=90, layers=False)
    ax = plots.pair_cosines(align(history)).axes[0]
    steps, values = pair_values(history, "a", "b")
    band = ax.collections[0].get_paths()[0].vertices
    for k in range(9):
        chunk = values[10 * k : 10 * k + 10]
        drawn = band[band[:, 0] == steps[10 * k], 1]  # this bin's edges (and, drawn as steps, the previous bin's)
        assert np.isclose(drawn, min(chunk)).any() and np.isclose(drawn, max(chunk)).any()
    assert band[:, 1].min() == pytest.approx(min(values)) and band[:, 1].max() == pytest.approx(max(values))
    smooth = ax.lines[0]
    assert smooth.get_label() == "a/b (moving mean)" and smooth.get_xdata().tolist() == steps[::10]
    width = (steps[-1] - steps[0] + 1) // 30  # 3 steps: the mean of each value and the two before it
    assert smooth.get_ydata()[2] == pytest.approx(np.mean(values[20 - width + 1 : 21]))
    assert all(len(line.get_xdata()) <= 9 for line in ax.lines[:3])


def test_cancellation_update_norms_and_alignment_follow_the_definitions():
    history = drawn_run("partial", steps=40)
    run = align(history)
    reports = history.measured
    top, bottom = plots.cancellation_and_update(run).axes[:2]
    expected_cancel, expected_update = [], []
    for r in reports:
        G, w = r.gram.double().numpy(), r.weights.double().numpy()
        n = np.sqrt(np.diag(G))
        expected_update.append(np.sqrt(w @ G @ w))
        expected_cancel.append(1 - np.sqrt(w @ G @ w) / (w @ n))
    assert top.lines[0].get_ydata() == pytest.approx(expected_cancel, rel=1e-9)
    assert bottom.lines[0].get_ydata() == pytest.approx(expected_update, rel=1e-9)
    norms, alignment = plots.norms_and_alignment(run).axes[:2]
    c_steps = [r.step for r in reports if "c" in r.tasks]
    c_norms = [np.sqrt(r.gram[r.tasks.index("c"), r.tasks.index("c")].item()) for r in reports if "c" in r.tasks]
    assert norms.lines[2].get_xdata().tolist() == c_steps and norms.lines[2].get_ydata() == pytest.approx(c_norms)
    assert len(alignment.lines) == 3 + 1  # one per task, and the zero line


def test_layer_heatmap_holds_each_layers_lowest_pair_cosine():
    history = drawn_run("partial", steps=30)
    run = align(history)
    worst = plots.layer_worst_cosine(run, LAYERS)
    for s, r in enumerate(history.measured):
        for k, name in enumerate(LAYERS):
            G = r.layers[name].gram.double().numpy()
            T = len(r.tasks)
            assert worst[k, s] == pytest.approx(min(cosine(G, i, j) for i in range(T) for j in range(i + 1, T)))
    fig = plots.layer_heatmap(run, layer_profile(run))
    mesh = fig.axes[0].collections[0]
    assert mesh.get_array().shape == (4, 30)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == LAYERS
    assert any("branch point: enc.layer.2" in t for t in texts(fig))


def test_long_runs_are_binned_by_training_step():
    steps = np.arange(0, 3000, 3)
    values = np.vstack([np.sin(steps / 100.0), np.where(steps % 2 == 0, steps / 3000.0, np.nan)])
    edges, binned = plots._bin_steps(steps, values, 200)
    assert len(edges) == 201 and binned.shape == (2, 200)
    for b in (0, 57, 199):
        inside = (steps >= edges[b]) & (steps < edges[b + 1])
        assert binned[0, b] == pytest.approx(values[0, inside].mean())
        assert binned[1, b] == pytest.approx(np.nanmean(values[1, inside]))


def test_layer_profile_bars_are_the_worst_pair_persistence():
    history = drawn_run("full", steps=20)
    profile = layer_profile(history)
    ax = plots.layer_profile_figure(profile).axes[0]
    widths = [bar.get_width() for bar in ax.patches]
    for layer, width in zip(profile.layers, widths):
        _, values = pair_values(history, "a", "b", layer=layer.name)
        if layer.name in ("enc.layer.2", "enc.layer.3"):  # a and b conflict there by construction
            assert width == pytest.approx(np.mean(np.array(values) < 0)) and width > 0.5
        else:
            assert width < 0.5
    assert "branch point: enc.layer.2" in ax.get_title()


def test_affinity_matrix_orders_the_tasks_by_group():
    N = np.array([[1.0, -0.5, 0.2], [-0.4, 1.0, 0.1], [0.3, 0.05, 1.0]])
    fig = plots.affinity_matrix(N, ["a", "b", "c"], [["b"], ["a", "c"]])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b", "a", "c"]
    shown = ax.images[0].get_array()
    assert shown[0, 1] == N[1, 0] and shown[1, 2] == N[0, 2]  # (b onto a) and (a onto c)
    assert len(ax.patches) == 2  # one outline per group


def test_what_was_never_measured_is_said_not_drawn():
    run = align(drawn_run("round_robin", steps=9))
    assert NO_PAIR in texts(plots.pair_cosines(run))
    assert NO_PAIR in texts(plots.layer_heatmap(run, None))
    assert NO_PAIR in texts(plots.cancellation_and_update(run))
    bare = align(drawn_run("full", steps=5, layers=False))
    assert any("carry no layers" in t for t in texts(plots.layer_heatmap(bare, None)))
    assert any("carry no layers" in t for t in texts(plots.layer_profile_figure(None)))


def test_images_for_the_dashboards():
    fig = plots.cosine_heatmap(np.array([[1.0, -0.25], [-0.25, 1.0]]), ["a", "b"])
    assert "-0.25" in texts(fig)
    rgb = plots.figure_to_rgb(fig)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 10


def test_the_old_name_of_the_profile_figure_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="layer_profile_figure"):
        assert plots.layer_profile is plots.layer_profile_figure


def test_the_examples_figure_draws_the_curve_and_each_named_ids_share():
    import torch

    from gradconflict.diagnosis.examples import carried_curve, conflicting_examples
    from gradconflict.records.samples import SampleTally

    tally = SampleTally()  # ids 0..2 push the pair apart (3, 2, 1), ranked first; 3..39 pull it together
    tally.add_pair(("a", "b"), list(range(40)), torch.tensor([-3.0, -2.0, -1.0] + [0.5] * 37),
                   torch.tensor([-3.0, -2.0, -1.0] + [1.0] * 37))
    found = conflicting_examples(tally, "a", "b")
    fig = plots.conflicting_examples_figure([found], {("a", "b"): carried_curve(tally, "a", "b")})
    curve_ax, bars_ax = fig.axes
    x, y = curve_ax.lines[0].get_data()
    assert x[:4] == pytest.approx([0, 1 / 40, 2 / 40, 3 / 40]) and y[:4] == pytest.approx([0, 3 / 6, 5 / 6, 1.0])
    assert [float(p.get_height()) for p in bars_ax.patches] == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    assert [t.get_text() for t in bars_ax.get_xticklabels()] == ["0", "1", "2"]
    empty = plots.conflicting_examples_figure([], {})
    assert "sample_ids" in texts(empty)[0]
