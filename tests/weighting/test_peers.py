"""Each method's update equals TorchJD 0.18's aggregator on the explicit Jacobian (float64, relative error
<= 1e-6): on random, dependent, conflicting and badly scaled Jacobians, and on real model steps, where TorchJD's
``mtl_backward`` + ``jac_to_grad`` is the reference for every parameter (shared and heads). For MGDA and PCGrad,
which are native, this checks the method; for the TorchJD-backed ones, the Gram and the plumbing."""

from __future__ import annotations

import copy

import pytest
import torch

from gradconflict import ConflictMonitor
from gradconflict.weighting import METHODS, make_weighting
from tests.weighting.peers import AGGREGATORS, PCGRAD_SEED, jacobian, no_common_descent, relative_error
from tests.zoo import FAMILIES, losses_of

autojac = pytest.importorskip("torchjd.autojac")

TOL = 1e-6

pytestmark = [
    pytest.mark.filterwarnings("ignore:Solution may be inaccurate"),  # cvxpy under TorchJD's own Nash-MTL
    pytest.mark.filterwarnings("ignore:.*not DPP"),
    pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching"),
]


def test_every_named_method_has_a_reference():
    assert set(AGGREGATORS) == set(METHODS)


def _peer_update(name: str, J: torch.Tensor) -> torch.Tensor:
    aggregator = AGGREGATORS[name](len(J))
    with torch.random.fork_rng():
        torch.manual_seed(PCGRAD_SEED)
        return aggregator(J)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("kind", ["random", "dependent", "conflicting", "scaled"])
@pytest.mark.parametrize("T", [2, 3, 5])
def test_update_equals_torchjd_aggregator_on_random_jacobians(name, kind, T):
    for seed in range(3):
        J = jacobian(kind, T, seed=seed)
        losses = {f"t{i}": 1.0 for i in range(T)}
        weights = make_weighting(name)(J @ J.T, losses)
        if name == "nash-mtl" and kind == "scaled" and T > 2:
            # Norms over four decades: the authors' convex-concave iterations stop (20 iterations) far from
            # alpha_i (G alpha)_i = 1 and ECOS reports inaccurate solutions, so two runs on Grams equal to
            # rounding part ways; the weights are still defined: finite, the update clipped to max_norm = 1.
            assert float((J.T @ weights).norm()) <= 1 + 1e-12
            continue
        if name == "nash-mtl" and no_common_descent(J):
            # no bargaining solution (the authors' solver returns arbitrary weights): alpha stays at its start,
            # 1 each, and the update is clipped to max_norm = 1
            total = J.sum(0)
            assert relative_error(J.T @ weights, total / max(1.0, float(total.norm()))) <= TOL
            continue
        # (a Pareto-stationary step's update is 0 up to rounding: the error is then relative to the task norms)
        floor = 1e-6 * float(J.norm(dim=1).max())
        assert relative_error(J.T @ weights, _peer_update(name, J), floor) <= TOL, (name, kind, T, seed)


def _model_step(family: str, T: int):
    model, x = FAMILIES[family](T)
    return model.double(), x.double() if x.is_floating_point() else x


STEP_CASES = [(f, m) for f in ("mlp", "transformer", "deep_heads") for m in sorted(METHODS)] + [
    ("cnn", "upgrad"), ("cnn", "pcgrad"),  # BatchNorm: the Gram and the routing do not depend on the method
]


@pytest.mark.parametrize(("family", "name"), STEP_CASES)
def test_monitored_steps_equal_torchjd_mtl_backward(family, name):
    """Three consecutive steps (the stateful methods carry their state across them): ``.grad`` of every
    parameter after ``monitor.backward(..., weighting=name)`` equals ``mtl_backward`` + ``jac_to_grad`` with
    TorchJD's aggregator."""
    torch.manual_seed(0)
    model, x = _model_step(family, 3)
    twin = copy.deepcopy(model)
    batches = [x] + [torch.randn_like(x) if x.is_floating_point() else x.flip(0) for _ in range(2)]
    aggregator = AGGREGATORS[name](3)
    with ConflictMonitor(model, shared=model.backbone) as monitor, torch.random.fork_rng():
        torch.manual_seed(PCGRAD_SEED)
        for b in batches:
            model.zero_grad(set_to_none=True)
            twin.zero_grad(set_to_none=True)
            report = monitor.backward(losses_of(model(b)), weighting=name)
            assert not report.skipped
            h = twin.backbone(b)
            if twin.pool is not None:
                h = twin.pool(h)
            losses = losses_of({t: head(h) for t, head in twin.heads.items()})
            autojac.mtl_backward(list(losses.values()), features=h)
            autojac.jac_to_grad(list(twin.backbone.parameters()), aggregator)
            for part in ["backbone", *(f"heads.{t}" for t in model.heads)]:
                ours, peer = (_flat_grad(m.get_submodule(part)) for m in (model, twin))
                assert relative_error(ours, peer) <= TOL, (name, family, part)


def _flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])
