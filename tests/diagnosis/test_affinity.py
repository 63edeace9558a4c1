import numpy as np
import pytest
import torch
from torch import nn

from gradconflict import metrics
from gradconflict.diagnosis import lookahead_transference, mean_transference, normalized


def test_mean_transference_is_the_mean_of_the_metric(make_report, make_pair):
    r1 = make_report(make_pair(-0.5, norms=(1.0, 2.0)), losses=[1.0, 2.0])
    r2 = make_report(make_pair(0.5, norms=(2.0, 1.0)), losses=[0.5, 4.0])
    expected = (metrics.transference(r1.gram, r1.losses, 0.1) + metrics.transference(r2.gram, r2.losses, 0.1)) / 2
    assert mean_transference([r1, r2], lr=0.1) == pytest.approx(expected.numpy())
    N = normalized(mean_transference([r1, r2], lr=0.1))
    assert np.diagonal(N) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError):
        mean_transference([])


def test_normalized_leaves_nonpositive_self_affinity_unscaled():
    Z = np.array([[-1.0, 2.0], [3.0, 4.0]])
    assert normalized(Z).tolist() == [[-1.0, 0.5], [3.0, 1.0]]


def _two_task_model():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
    model = nn.ModuleDict({"body": body, "a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    x = torch.randn(32, 3)
    ya, yb = x[:, 0:1], -x[:, 0:1]

    def losses():
        h = model["body"](x)
        return {"a": (model["a"](h) - ya).pow(2).mean(), "b": (model["b"](h) - yb).pow(2).mean()}

    return model, losses


def test_lookahead_matches_first_order_for_small_steps_and_restores():
    model, losses = _two_task_model()
    before = [p.detach().clone() for p in model.parameters()]
    lr = 1e-4
    tasks, Z = lookahead_transference(model, losses, lr)
    assert tasks == ["a", "b"]
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    # First order over *all* parameters: Z_ij ~ lr <g_i, g_j> / L_j.
    L = losses()
    params = list(model.parameters())
    g = []
    for t in tasks:
        grads = torch.autograd.grad(L[t], params, retain_graph=True, allow_unused=True)
        g.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, grads)]))
    G = torch.stack(g) @ torch.stack(g).T
    first = metrics.transference(G.detach(), torch.stack([L[t].detach() for t in tasks]), lr).numpy()
    assert Z == pytest.approx(first, rel=0.05, abs=1e-9)


def test_mean_transference_by_name_over_the_steps_carrying_both(make_cut, make_gram):
    G = make_gram([[1.0, -0.5, 0.4], [-0.5, 1.0, 0.2], [0.4, 0.2, 1.0]], norms=[1.0, 2.0, 1.0])
    losses = [1.0, 2.0, 4.0]
    run = [
        make_cut("ba", G, step=0, tasks="abc", losses=losses),
        make_cut("cab", 2 * G, step=1, tasks="abc", losses=losses),
    ]
    Z = mean_transference(run)
    # a/b on both steps: Z_ab = mean(G_ab, 2 G_ab) / L_b = 1.5 * (-0.5 * 2) / 2; a/c only on step 1: 2 G_ac / L_c.
    assert Z[0, 1] == pytest.approx(1.5 * -1.0 / 2) and Z[0, 2] == pytest.approx(2 * 0.4 / 4)
    assert Z[2, 2] == pytest.approx(2 * 1.0 / 4)  # c alone on step 1
    reordered = [make_cut("ab", G, step=0, tasks="abc", losses=losses),
                 make_cut("bca", 2 * G, step=1, tasks="abc", losses=losses)]
    assert np.array_equal(mean_transference(reordered), Z)
    never = mean_transference([make_cut("ab", G, tasks="abc"), make_cut("c", G, step=1, tasks="abc")])
    assert np.isnan(never[0, 2]) and np.isnan(never[2, 1]) and never[2, 2] == 1.0
