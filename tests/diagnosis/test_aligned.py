import math

import numpy as np
import pytest
import torch

from gradconflict import ConflictReport, History, LayerReport
from gradconflict.diagnosis import Aligned, align
from gradconflict.diagnosis.aligned import masked_mean, no_pair_reason
from gradconflict.measure import metrics


def _permuted(G, order):
    P = torch.tensor(order)
    return G[P][:, P]


def test_align_puts_every_step_on_the_sorted_task_names(make_gram):
    # Step 5 lists its tasks as (c, a), step 3 as (a, b, c): the arrays follow a, b, c either way.
    G3 = make_gram([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]], norms=[1.0, 2.0, 3.0])
    Gca = torch.tensor([[9.0, -1.5], [-1.5, 4.0]], dtype=torch.float64)  # c has norm 3, a has norm 2
    top3 = LayerReport("top", "abc", G3 / 2, num_params=7)
    top2 = LayerReport("top", ("c", "a"), Gca, num_params=8)
    h = History()
    h.append(ConflictReport(("c", "a"), Gca, losses=torch.tensor([3.0, 1.0]), layers={"top": top2}, step=5))
    h.append(ConflictReport.skipped_step("ab", step=4, reason="nan"))
    h.append(ConflictReport("abc", G3, layers={"bottom": LayerReport("bottom", "abc", G3 / 2), "top": top3}, step=3))
    A = align(h)
    assert isinstance(A, Aligned) and align(A) is A
    assert A.tasks == ("a", "b", "c") and A.steps.tolist() == [3, 5] and A.num_steps == 2
    assert A.present.tolist() == [[True, True, True], [True, False, True]]
    assert A.gram[0] == pytest.approx(G3.numpy())
    expected = np.array([[4.0, np.nan, -1.5], [np.nan, np.nan, np.nan], [-1.5, np.nan, 9.0]])
    np.testing.assert_array_equal(A.gram[1], expected)
    # Losses: the first step recorded none (NaN), the second c = 3 and a = 1.
    assert A.has_losses.tolist() == [False, True]
    np.testing.assert_array_equal(A.losses, [[np.nan] * 3, [1.0, np.nan, 3.0]])
    np.testing.assert_array_equal(A.weights, [[1.0, 1.0, 1.0], [1.0, np.nan, 1.0]])
    # Layers bottom to top, as the reports list them; "bottom" missing from step 5.
    assert A.layers == ("bottom", "top")
    assert A.layer_present.tolist() == [[True, True], [False, True]]
    assert A.layer_params.tolist() == [0, 8]  # the last step carrying "top" reported 8
    np.testing.assert_array_equal(A.layer_gram[1, 1], expected)
    assert np.isnan(A.layer_gram[1, 0]).all()
    assert A.index("c") == 2
    with pytest.raises(ValueError, match="no measured step carries task 'z'"):
        A.index("z")


def test_aligned_metrics_equal_the_torch_metrics_step_by_step(make_gram):
    rng = np.random.default_rng(0)
    reports, tasks = [], ("w", "x", "y", "z")
    for s in range(6):
        J = rng.normal(size=(4, 5))
        if s == 2:
            J[1] = 0.0  # a zero-norm task: cosines 0, never conflicting
        G = torch.tensor(J @ J.T)
        order = rng.permutation(4).tolist()
        weights = torch.tensor(rng.uniform(0.5, 2.0, 4))
        reports.append(ConflictReport(tuple(tasks[k] for k in order), _permuted(G, order), weights[order], step=s))
    A = align(reports)
    assert A.tasks == tasks
    for s, r in enumerate(reports):
        back = [r.tasks.index(t) for t in tasks]  # report order -> sorted order
        P = torch.tensor(back)
        assert A.cosine[s] == pytest.approx(r.cosine[P][:, P].numpy(), abs=1e-12)
        assert A.cancellation[s] == pytest.approx(float(r.cancellation), abs=1e-12)
        assert A.update_norm[s] == pytest.approx(float(r.update_norm), abs=1e-12)
        assert A.task_norms[s] == pytest.approx(r.task_norms[P].numpy(), abs=1e-12)
        assert A.alignment[s] == pytest.approx(r.alignment[P].numpy(), abs=1e-12)
        for S in (0.0, -0.3):
            mask = metrics.conflict_pairs(r.gram[P][:, P], S).numpy()
            assert A.conflicts(S)[s].tolist() == mask.tolist()
            assert A.conflict_fraction(S)[s] == pytest.approx(float(metrics.conflict_fraction(r.gram, S)))
        cos = r.cosine.numpy()
        assert A.worst_cosine[s] == pytest.approx(cos[np.triu_indices(4, 1)].min(), abs=1e-12)
    assert A.cosine[2, 1].tolist() == [0.0, 0.0, 0.0, 0.0]  # the zero-norm task


def test_partial_steps_are_measured_on_the_tasks_they_carry(make_gram):
    # Step 0 carries a, b, c; step 1 only b and a (as the losses dict listed them), step 2 only c.
    full = make_gram([[1.0, 0.5, -0.6], [0.5, 1.0, 0.2], [-0.6, 0.2, 1.0]])
    ba = torch.tensor([[4.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)  # b norm 2, a norm 1, cos(a, b) = -0.5
    run = [
        ConflictReport("abc", full, step=0),
        ConflictReport(("b", "a"), ba, step=1),
        ConflictReport(("c",), torch.ones(1, 1, dtype=torch.float64), step=2),
    ]
    A = align(run)
    assert A.multi.tolist() == [True, True, False]
    assert A.cosine[1, 0, 1] == pytest.approx(-0.5) and np.isnan(A.cosine[1, 0, 2])
    assert A.conflict_fraction().tolist()[:2] == pytest.approx([1 / 3, 1.0]) and np.isnan(A.conflict_fraction()[2])
    # Step 1, by hand: w = (1, 1); |g_a + g_b|^2 = 1 + 4 - 2 = 3; cancellation 1 - sqrt(3) / (1 + 2).
    assert A.cancellation[1] == pytest.approx(1 - math.sqrt(3) / 3)
    # alignment_a = (G w)_a / (n_a u) = (1 - 1) / (1 * sqrt(3)) = 0; alignment_b = (4 - 1) / (2 sqrt(3)).
    assert A.alignment[1, :2] == pytest.approx([0.0, 3 / (2 * math.sqrt(3))])
    assert np.isnan(A.alignment[1, 2]) and np.isnan(A.alignment[2]).all()
    assert A.worst_cosine[:2] == pytest.approx([-0.6, -0.5]) and np.isnan(A.worst_cosine[2])
    assert np.isnan(A.cancellation[2])
    # Pair counts: a/b on steps 0 and 1, a/c and b/c on step 0 only; the diagonal counts each task's steps.
    assert A.pair_counts().tolist() == [[2, 2, 1], [2, 2, 1], [1, 1, 2]]
    assert A.together_phrase(0, 2) == "tasks a and c were measured together on 1 of 3 measured steps"
    assert no_pair_reason(A) is None


def test_transference_uses_each_steps_losses_by_name(make_gram):
    G = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    r = ConflictReport(("b", "a"), G, losses=torch.tensor([4.0, 2.0]))  # L_b = 4, L_a = 2
    Z = align([r]).transference(lr=0.5)[0]
    # In sorted order (a, b): G_aa = 2, G_ab = -0.5, G_bb = 1; Z_ij = lr G_ij / L_j.
    assert Z == pytest.approx(np.array([[0.5 * 2 / 2, 0.5 * -0.5 / 4], [0.5 * -0.5 / 2, 0.5 * 1 / 4]]))


def test_no_pair_reason_and_empty_runs():
    rr = [ConflictReport(t, torch.ones(1, 1), step=s) for s, t in enumerate("abcabc")]
    why = no_pair_reason(align(rr))
    assert "no measured step carried two tasks together" in why and "6 measured steps" in why
    assert "monitor.measure(losses)" in why
    assert "single task (a)" in no_pair_reason(align([ConflictReport("a", torch.ones(1, 1))]))
    empty = align([ConflictReport.skipped_step("ab", 0, "nan")])
    assert empty.num_steps == 0 and empty.tasks == () and empty.gram.shape == (0, 0, 0)
    assert "no measured step" in no_pair_reason(empty)


def test_masked_mean():
    values = np.array([[1.0, np.nan, 4.0], [3.0, 5.0, np.nan]])
    mask = np.array([[True, False, True], [True, True, False]])
    out = masked_mean(values, mask)
    assert out.tolist() == [2.0, 5.0, 4.0]
    assert np.isnan(masked_mean(values, np.zeros_like(mask))).all()


def test_layer_grams_keep_their_precision_and_blocks_change_nothing(make_gram, monkeypatch):
    from gradconflict.diagnosis import aligned as module

    rng = np.random.default_rng(1)
    run = []
    for s in range(5):
        layers = {}
        for k in range(4):
            J = rng.normal(size=(3, 4))
            layers[f"l{k}"] = LayerReport(f"l{k}", "abc", torch.tensor(J @ J.T, dtype=torch.float32), num_params=2)
        total = sum(lr.gram for lr in layers.values())
        names = "abc" if s % 2 else "ab"  # every other step lacks c
        keep = torch.tensor(["abc".index(t) for t in names])
        layers = {n: LayerReport(n, names, lr.gram[keep][:, keep]) for n, lr in layers.items()}
        run.append(ConflictReport(names, total[keep][:, keep], layers=layers, step=s))
    A = align(run)
    assert A.layer_gram.dtype == np.float32 and A.gram.dtype == np.float64
    assert A.layer_gram[1, 2] == pytest.approx(run[1].layers["l2"].gram.numpy())
    cosines = A.layer_cosine()
    assert np.isnan(cosines[0, 3, 2]).all() and cosines[1, 3] == pytest.approx(run[1].layers["l3"].cosine.numpy())
    monkeypatch.setattr(module, "_BLOCK", 1)  # one layer and one step per tile
    tiles = list(A.layer_blocks(0.0))
    assert [(r, b) for r, b, _, _ in tiles] == [(slice(s, s + 1), slice(k, k + 1)) for k in range(4) for s in range(5)]
    tiled = np.full_like(cosines, -7.0)
    for rows, layers, c, _ in tiles:
        tiled[rows, layers] = c
    np.testing.assert_array_equal(tiled, cosines)
    for rows, layers, _, conflicts in tiles:  # the conflict masks are metrics.conflict_pairs of each layer, by name
        r = run[rows.start]
        keep = [("abc".index(t)) for t in r.tasks]
        mask = metrics.conflict_pairs(r.layers[f"l{layers.start}"].gram.double(), 0.0).numpy()
        assert conflicts[0, 0][np.ix_(keep, keep)].tolist() == mask.tolist()
    wide = run + [ConflictReport("ab", torch.eye(2, dtype=torch.float64), step=9,
                                 layers={"l0": LayerReport("l0", "ab", torch.eye(2, dtype=torch.float64))})]
    assert align(wide).layer_gram.dtype == np.float64
