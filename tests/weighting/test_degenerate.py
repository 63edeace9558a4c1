"""Degenerate steps give a defined result, derived here from each method's definition: a task with a zero
gradient, a single task, identical tasks, exactly opposite tasks. The update is a multiple ``f g`` of the one
gradient direction ``g`` (|g| = 3) in each case."""

from __future__ import annotations

import pytest
import torch

from gradconflict import ConflictMonitor
from gradconflict.weighting import METHODS, make_weighting

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate")

NORM = 3.0
C = 0.4  # CAGrad's default radius

#: method -> the factor f of the update f g for each case. Zero: (g, 0); single: (g,); identical: (g, g);
#: opposite: (g, -g).
EXPECTED = {
    # the min-norm point of the hull: 0 when 0 is in it, else the common vector
    "mgda": {"zero": 0.0, "single": 1.0, "identical": 1.0, "opposite": 0.0},
    "mgda-fw": {"zero": 0.0, "single": 1.0, "identical": 1.0, "opposite": 0.0},
    # no projection without a negative inner product; opposite tasks project each other away
    "pcgrad": {"zero": 1.0, "single": 1.0, "identical": 2.0, "opposite": 0.0},
    # mean of the projections onto {x: <x, g_j> >= 0}: g projects to g, 0 to 0; opposite: the cone is g's normal
    # plane, both project to 0
    "upgrad": {"zero": 0.5, "single": 1.0, "identical": 1.0, "opposite": 0.0},
    # the mean, projected onto the same cone
    "dualproj": {"zero": 0.5, "single": 1.0, "identical": 1.0, "opposite": 0.0},
    # g_0 + c |g_0| g_w / |g_w|: with a zero task the dual puts all weight on it (g_w = 0: Pareto-stationary,
    # no update); one task or identical tasks: g_w = g_0 = g, so (1 + c) g; opposite: g_0 = 0
    "cagrad": {"zero": 0.0, "single": 1.0 + C, "identical": 1.0 + C, "opposite": 0.0},
    # w = G^+ n / sum(G^+ n): (1/|g|, 0) normalised for a zero task; opposite: G^+ n = 0, weights 0
    "imtl-g": {"zero": 1.0, "single": 1.0, "identical": 1.0, "opposite": 0.0},
    # B w_0 with B the projector on G's range, rescaled to its one eigenvalue: the range is span(g)
    "aligned-mtl": {"zero": 0.5, "single": 1.0, "identical": 1.0, "opposite": 0.0},
    # alpha_i (G alpha)_i = 1: one task alpha = 1/|g|; identical: alpha_i = 1/(sqrt(2)|g|), update of norm
    # sqrt(2) clipped to max_norm 1; no solution with a zero or an opposite task: alpha stays at 1 each, the
    # update g (clipped to norm 1) or 0
    "nash-mtl": {"zero": 1 / NORM, "single": 1 / NORM, "identical": 1 / NORM, "opposite": 0.0},
}


def _g(n: int = 7) -> torch.Tensor:
    g = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return g / g.norm() * NORM


def _rows(case: str) -> torch.Tensor:
    g = _g()
    return {
        "zero": torch.stack([g, torch.zeros_like(g)]),
        "single": g[None],
        "identical": torch.stack([g, g]),
        "opposite": torch.stack([g, -g]),
    }[case]


def test_every_method_has_its_degenerate_cases():
    assert set(EXPECTED) == set(METHODS)


@pytest.mark.parametrize("case", ["zero", "single", "identical", "opposite"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_degenerate_update(name, case):
    J = _rows(case)
    weights = make_weighting(name)(J @ J.T, {f"t{i}": 1.0 for i in range(len(J))})
    assert torch.isfinite(weights).all()
    expected = EXPECTED[name][case] * _g()
    assert float((J.T @ weights - expected).norm()) <= 1e-6 * NORM, (name, case, weights.tolist())


class _Net(torch.nn.Module):
    """A shared Linear and two linear heads with the same weights, whose losses make the degenerate cases on a real
    graph while each head stays its own task's."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(3, 4)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})
        self.heads["b"].load_state_dict(self.heads["a"].state_dict())

    def losses(self, x: torch.Tensor, case: str) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.backbone(x))
        a, b = self.heads["a"](h).mean(), self.heads["b"](h).mean()
        if case == "identical":
            return {"a": a, "b": b}
        if case == "opposite":
            return {"a": a, "b": -b}
        return {"a": a, "b": (0 * h).sum() + self.heads["b"](h.detach()).mean()}  # a zero gradient on the backbone


@pytest.mark.parametrize("case", ["zero", "identical", "opposite"])
def test_degenerate_steps_through_the_monitor(case):
    """MGDA on a float64 model: the shared update is the case's (0, g_a, 0), and every head gets its own
    gradient (T separate autograd.grad calls are the reference)."""
    torch.manual_seed(0)
    net = _Net().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    with ConflictMonitor(net, shared=net.backbone) as monitor:
        monitor.backward(net.losses(x, case), weighting="mgda")
    losses = net.losses(x, case)
    g_a = torch.autograd.grad(losses["a"], list(net.backbone.parameters()), retain_graph=True)
    for p, want in zip(net.backbone.parameters(), g_a):
        assert torch.allclose(p.grad, want if case == "identical" else torch.zeros_like(want), atol=1e-12), case
    for t, head in net.heads.items():
        own = torch.autograd.grad(losses[t], list(head.parameters()), retain_graph=True)
        for p, want in zip(head.parameters(), own):
            assert torch.allclose(p.grad, want, atol=1e-12), (case, t)
