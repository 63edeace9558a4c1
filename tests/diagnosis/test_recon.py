"""Recon's layer selection (Shi et al., ICLR 2023, Algorithm 1) against a direct count over the reports."""

import numpy as np
import pytest
import torch

from gradconflict import ConflictReport, LayerReport
from gradconflict.diagnosis import recon_layers, recon_scores


def _run(seed=0, steps=20, layers=4, tasks="abc"):
    rng = np.random.default_rng(seed)
    run = []
    for s in range(steps):
        reports = {}
        for k in range(layers):
            J = rng.normal(size=(len(tasks), 6))
            J[1] -= (k / layers) * 1.5 * J[0]  # higher layers: b is pushed against a
            reports[f"l{k}"] = LayerReport(f"l{k}", tasks, torch.tensor(J @ J.T), num_params=6)
        total = sum(r.gram for r in reports.values())
        run.append(ConflictReport(tasks, total, layers=reports, step=10 * s))
    return run


def _by_hand(run, S, first=-np.inf, last=np.inf):
    """Algorithm 1's score: for each layer, sum over the iterations and the pairs i < j of 1[cos < S]."""
    scores = {}
    for r in run:
        if not first <= r.step <= last:
            continue
        for name, layer in r.layers.items():
            C = layer.cosine.numpy()
            T = C.shape[0]
            scores[name] = scores.get(name, 0) + sum(C[i, j] < S for i in range(T) for j in range(i + 1, T))
    return scores


@pytest.mark.parametrize("S", [0.0, -0.1])
def test_scores_are_algorithm_1(S):
    run = _run()
    assert recon_scores(run, threshold=S) == _by_hand(run, S)
    assert recon_scores(run, threshold=S, window=(0, 90)) == _by_hand(run, S, 0, 90)  # the first ten iterations


def test_top_k_layers_wherever_they_are():
    run = _run()
    scores = _by_hand(run, 0.0)
    selection = recon_layers(run, k=2)
    assert selection.layers == sorted(scores, key=lambda n: -scores[n])[:2]
    assert selection.scores == scores and selection.window == (0, 190) and selection.k == 2
    # Not contiguous by construction: a run where only l0 and l2 conflict selects exactly those.
    fight, calm = torch.tensor([[1.0, -0.6], [-0.6, 1.0]]), torch.tensor([[1.0, 0.6], [0.6, 1.0]])
    layers = {n: LayerReport(n, "ab", fight if n in ("l0", "l2") else calm) for n in ("l0", "l1", "l2", "l3")}
    run = [ConflictReport("ab", calm, layers=layers, step=s) for s in range(5)]
    assert sorted(recon_layers(run, k=3).layers) == ["l0", "l2"]  # layers that never conflict are not chosen
    with pytest.raises(ValueError, match="non-negative"):
        recon_layers(run, k=-1)
