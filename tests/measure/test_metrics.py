"""Metrics on hand-made Grams whose answers are known, no model involved."""

from __future__ import annotations

import math

import pytest
import torch

from gradconflict.measure import metrics as m


def gram(*vectors):
    J = torch.tensor(vectors, dtype=torch.float64)
    return J @ J.T


def test_orthogonal_tasks():
    G = gram([1, 0, 0], [0, 2, 0], [0, 0, 3])
    assert torch.allclose(m.task_norms(G), torch.tensor([1.0, 2.0, 3.0], dtype=G.dtype))
    assert torch.allclose(m.cosine(G), torch.eye(3, dtype=G.dtype))
    assert m.conflict_fraction(G).item() == 0.0
    assert m.update_norm(G).item() == pytest.approx(math.sqrt(14))
    assert m.cancellation(G).item() == pytest.approx(1 - math.sqrt(14) / 6)
    assert torch.allclose(m.alignment(G), torch.tensor([1, 2, 3], dtype=G.dtype) / math.sqrt(14))
    assert m.condition_number(G).item() == pytest.approx(3.0)
    assert m.magnitude_similarity(G)[0, 1].item() == pytest.approx(2 * 1 * 2 / (1 + 4))


def test_opposite_tasks_cancel_completely():
    G = gram([1, 2], [-1, -2])
    assert m.cosine(G)[0, 1].item() == pytest.approx(-1.0)
    assert m.conflict_pairs(G).tolist() == [[False, True], [False, False]]
    assert m.conflict_fraction(G).item() == 1.0
    assert m.update_norm(G).item() == pytest.approx(0.0, abs=1e-12)
    assert m.cancellation(G).item() == pytest.approx(1.0)
    assert m.alignment(G).tolist() == [0.0, 0.0]  # no update: alignment is defined as 0, not NaN
    assert math.isinf(m.condition_number(G).item())


def test_weights_change_update_and_alignment():
    G = gram([1, 0], [-1, 1])
    w = torch.tensor([2.0, 1.0], dtype=G.dtype)  # update = (1, 1)
    assert m.update_norm(G, w).item() == pytest.approx(math.sqrt(2))
    assert m.cancellation(G, w).item() == pytest.approx(1 - math.sqrt(2) / (2 + math.sqrt(2)))
    assert m.alignment(G, w).tolist() == pytest.approx([1 / math.sqrt(2), 0.0], abs=1e-12)
    assert m.loss_change(G, w, lr=0.1).tolist() == pytest.approx([-0.1, 0.0], abs=1e-12)


def test_identical_tasks():
    G = gram([1, 1], [1, 1], [1, 1])
    assert torch.allclose(m.cosine(G), torch.ones(3, 3, dtype=G.dtype))
    assert m.cancellation(G).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(m.alignment(G), torch.ones(3, dtype=G.dtype))
    assert torch.allclose(m.magnitude_similarity(G), torch.ones(3, 3, dtype=G.dtype))


def test_zero_norm_task_is_flagged_not_nan():
    G = gram([1, 0], [0, 0], [-1, 0])
    assert m.zero_norm_tasks(G).tolist() == [False, True, False]
    for value in (m.cosine(G), m.alignment(G), m.magnitude_similarity(G), m.cancellation(G)):
        assert not torch.isnan(value).any()
    assert m.cosine(G)[1].tolist() == [0.0, 0.0, 0.0]
    assert m.conflict_pairs(G).sum().item() == 1  # only the (0, 2) pair
    assert m.conflict_fraction(G).item() == pytest.approx(1 / 3)
    assert m.magnitude_similarity(torch.zeros(2, 2))[0, 1].item() == 1.0
    assert m.cancellation(torch.zeros(2, 2)).item() == 0.0


def test_single_task():
    G = gram([3, 4])
    assert m.conflict_fraction(G).isnan()  # no pair: not "no conflict"
    assert m.condition_number(G).item() == 1.0
    assert m.cancellation(G).item() == pytest.approx(0.0, abs=1e-12)


def test_fifty_tasks_match_direct_computation():
    J = torch.randn(50, 80, dtype=torch.float64)
    G = J @ J.T
    n = J.norm(dim=1)
    C = (J / n[:, None]) @ (J / n[:, None]).T
    assert torch.allclose(m.cosine(G), C)
    iu = torch.triu_indices(50, 50, 1)
    assert m.conflict_fraction(G).item() == pytest.approx((C[iu[0], iu[1]] < 0).double().mean().item())
    g = J.sum(0)
    assert m.cancellation(G).item() == pytest.approx(1 - g.norm().item() / n.sum().item())
    assert torch.allclose(m.alignment(G), (J @ g) / (n * g.norm()))
    s = torch.linalg.svdvals(J)
    assert m.condition_number(G).item() == pytest.approx((s[0] / s[-1]).item(), rel=1e-6)


def test_threshold_and_transference():
    G = gram([1, 0], [-0.05, 1])
    assert m.conflict_fraction(G, threshold=0.0).item() == 1.0
    assert m.conflict_fraction(G, threshold=-0.1).item() == 0.0
    Z = m.transference(G, torch.tensor([2.0, 0.5], dtype=G.dtype), lr=0.1)
    assert Z[0, 1].item() == pytest.approx(0.1 * -0.05 / 0.5)


def test_every_metric_takes_a_batch_of_grams_as_well_as_one():
    torch.manual_seed(0)
    J = torch.randn(5, 3, 7, dtype=torch.float64)
    G = J @ J.transpose(-1, -2)
    G[1, 2] = 0  # a zero-norm task in one of the steps
    G[1, :, 2] = 0
    w = torch.rand(5, 3, dtype=torch.float64)
    L = torch.rand(5, 3, dtype=torch.float64) + 0.5
    per_step = {
        "task_norms": lambda g, w, losses: m.task_norms(g),
        "zero_norm_tasks": lambda g, w, losses: m.zero_norm_tasks(g),
        "cosine": lambda g, w, losses: m.cosine(g),
        "conflict_pairs": lambda g, w, losses: m.conflict_pairs(g, -0.1),
        "conflict_fraction": lambda g, w, losses: m.conflict_fraction(g),
        "magnitude_similarity": lambda g, w, losses: m.magnitude_similarity(g),
        "update_norm": lambda g, w, losses: m.update_norm(g, w),
        "cancellation": lambda g, w, losses: m.cancellation(g, w),
        "alignment": lambda g, w, losses: m.alignment(g, w),
        "condition_number": lambda g, w, losses: m.condition_number(g),
        "loss_change": lambda g, w, losses: m.loss_change(g, w, lr=0.3),
        "transference": lambda g, w, losses: m.transference(g, losses, lr=0.3),
    }
    for name, f in per_step.items():
        batched = f(G, w, L)
        for s in range(5):
            torch.testing.assert_close(batched[s], f(G[s], w[s], L[s]), msg=name)
