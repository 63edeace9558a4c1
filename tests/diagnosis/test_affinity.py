import numpy as np
import pytest
import torch
from torch import nn

from gradconflict.diagnosis import lookahead_transference, mean_transference, normalized
from gradconflict.measure import metrics


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


class _Scalar(nn.Module):
    """``w * x``: one scalar parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.w * x


def _tag_example():
    """TAG's Eq. 1 by hand: one shared weight w = 1, heads h_a = h_b = 1, one input x = 1, targets y_a = 2, y_b = 0,
    L_t = (h_t w x - y_t)^2, so L_a = L_b = 1. A step of size 0.1 on L_a alone moves w by -0.1 * 2 (h_a w - y_a) h_a
    = +0.2 (w = 1.2): L_a = 0.64, L_b = 1.44, so Z_aa = 0.36 and Z_ab = -0.44; symmetrically w = 0.8 after a step on
    L_b: Z_ba = -0.44, Z_bb = 0.36. TAG's normalised affinity N_ab = Z_ab / Z_bb = -1.22. Stepping the heads too
    (what the library did before) inflates Z_bb to 1 - (0.8 * 0.8)^2 = 0.5904 and gives N_ab = -0.75."""
    model = nn.ModuleDict({"backbone": _Scalar(), "a": _Scalar(), "b": _Scalar()})
    x, y = torch.ones(1), {"a": torch.full((1,), 2.0), "b": torch.zeros(1)}

    def losses():
        h = model["backbone"](x)
        return {t: (model[t](h) - y[t]).pow(2).mean() for t in ("a", "b")}

    return model, losses


def test_lookahead_gives_tags_eq_1_on_a_worked_example():
    model, losses = _tag_example()
    tasks, Z = lookahead_transference(model, losses, lr=0.1)
    assert tasks == ["a", "b"]
    assert Z == pytest.approx(np.array([[0.36, -0.44], [-0.44, 0.36]]))
    assert normalized(Z)[0, 1] == pytest.approx(-0.44 / 0.36) and round(normalized(Z)[0, 1], 2) == -1.22
    # Stepping every parameter (heads included) is not TAG's definition: it inflates the self-affinity.
    _, everything = lookahead_transference(model, losses, lr=0.1, shared=model)
    assert everything[1, 1] == pytest.approx(1 - 0.64**2) and round(normalized(everything)[0, 1], 2) == -0.75


def test_lookahead_with_the_runs_optimizer():
    # Adam's first step moves each parameter by lr * sign(gradient): with lr = 0.2, w = 1.2 after a step on L_a
    # and 0.8 after one on L_b, the same numbers as SGD above. Its state is the run's: untouched afterwards.
    model, losses = _tag_example()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.2)
    _, Z = lookahead_transference(model, losses, optimizer=optimizer)
    assert Z == pytest.approx(np.array([[0.36, -0.44], [-0.44, 0.36]]), abs=1e-6)
    assert optimizer.state_dict()["state"] == {}
    # After a real step the moments carry over into the lookahead, and are restored after it.
    sum(losses().values()).backward()
    optimizer.step()
    saved = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
             for k, s in optimizer.state_dict()["state"].items()}
    before = [p.detach().clone() for p in model.parameters()]
    lookahead_transference(model, losses, optimizer=optimizer)
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[k][n], v) if torch.is_tensor(v) else after[k][n] == v
               for k, s in saved.items() for n, v in s.items())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="lr="):
        lookahead_transference(model, losses)
    with pytest.raises(ValueError, match="not in the optimizer"):
        lookahead_transference(model, losses, optimizer=torch.optim.SGD(model["a"].parameters(), lr=0.1))


def test_lookahead_has_no_side_effects():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Tanh())
    model = nn.ModuleDict({"backbone": backbone, "a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    x = torch.randn(32, 3)

    def losses():
        h = model["backbone"](x)
        return {"a": (model["a"](h) - x[:, :1]).pow(2).mean(), "b": (model["b"](h) + x[:, :1]).pow(2).mean()}

    model["a"].eval()  # a mode that must survive
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    _, Z = lookahead_transference(model, losses, lr=0.01)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BatchNorm statistics included
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert model.training and not model["a"].training and model["b"].training
    # Every evaluation draws the same dropout masks: with lr = 0 no step is taken, so nothing changes at all.
    _, zero = lookahead_transference(model, losses, lr=0.0)
    assert zero == pytest.approx(np.zeros((2, 2)), abs=1e-12)
    assert np.isfinite(Z).all()


def test_lookahead_matches_first_order_for_small_steps_on_the_shared_parameters():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
    model = nn.ModuleDict({"backbone": body, "a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    x = torch.randn(32, 3)
    ya, yb = x[:, 0:1], -x[:, 0:1]

    def losses():
        h = model["backbone"](x)
        return {"a": (model["a"](h) - ya).pow(2).mean(), "b": (model["b"](h) - yb).pow(2).mean()}

    lr = 1e-4
    tasks, Z = lookahead_transference(model, losses, lr)
    # First order over the *shared* parameters: Z_ij ~ lr <g_i, g_j>_shared / L_j.
    L = losses()
    params = list(body.parameters())
    g = [torch.cat([x.reshape(-1) for x in torch.autograd.grad(L[t], params, retain_graph=True)]) for t in tasks]
    G = torch.stack(g) @ torch.stack(g).T
    first = metrics.transference(G.detach(), torch.stack([L[t].detach() for t in tasks]), lr).numpy()
    assert Z == pytest.approx(first, rel=0.05, abs=1e-9)
    with pytest.raises(ValueError, match="pass shared="):
        lookahead_transference(nn.Sequential(nn.Linear(2, 2)), losses, lr)


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


def test_mean_transference_through_some_layers(make_report, make_pair):
    top, bottom = make_pair(-0.5, norms=(1.0, 2.0)), make_pair(0.9, norms=(3.0, 3.0))
    run = [make_report(top + bottom, step=s, layers={"bottom": (bottom, 9), "top": (top, 4)}, losses=[2.0, 4.0])
           for s in range(3)]
    expected = metrics.transference(top, torch.tensor([2.0, 4.0], dtype=torch.float64), 0.1).numpy()
    assert mean_transference(run, lr=0.1, layers=["top"]) == pytest.approx(expected)
    both = metrics.transference(top + bottom, torch.tensor([2.0, 4.0], dtype=torch.float64), 0.1).numpy()
    assert mean_transference(run, lr=0.1, layers=["top", "bottom"]) == pytest.approx(both)
    with pytest.raises(ValueError, match="never measured"):
        mean_transference(run, layers=["nope"])
