"""The methods against independent constructions (closed forms, optimality conditions, the algorithm run on
explicit vectors), their state, and how ``weighting=`` is resolved."""

from __future__ import annotations

import pytest
import torch

from gradconflict.weighting import (
    MGDA,
    FunctionWeighting,
    MGDAFrankWolfe,
    NashMTL,
    PCGrad,
    TorchJDWeighting,
    UPGrad,
    Weighting,
    make_weighting,
)
from tests.weighting.peers import jacobian, min_norm_qp, relative_error

pytestmark = [
    pytest.mark.filterwarnings("ignore:Solution may be inaccurate"),  # cvxpy under TorchJD's own Nash-MTL
    pytest.mark.filterwarnings("ignore:.*not DPP"),
]


def _tasks(T: int) -> dict[str, float]:
    return {f"t{i}": 1.0 for i in range(T)}


# ---------------------------------------------------------------------------------------------- MGDA
@pytest.mark.parametrize("seed", range(5))
def test_mgda_two_tasks_is_the_closed_form(seed):
    """Sener and Koltun, Algorithm 1: alpha = clip(<g2 - g1, g2> / |g1 - g2|^2, 0, 1) for two tasks."""
    J = jacobian("conflicting", 2, seed=seed)
    g1, g2 = J
    alpha = float(((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1))
    weights = MGDA()(J @ J.T, _tasks(2))
    assert torch.allclose(weights, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "dependent", "conflicting", "scaled"])
@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_mgda_is_the_exact_min_norm_point(kind, T):
    """Against quadprog on min alpha^T G alpha over the simplex (the update J^T alpha to 1e-9 of the largest task
    norm: alpha itself is not unique for dependent gradients), and the optimality conditions checked directly:
    alpha >= 0, sum 1, and (G alpha)_i >= alpha^T G alpha for every task (no task's loss rises to first order)."""
    for seed in range(10):
        J = jacobian(kind, T, seed=seed)
        G = J @ J.T
        scale = float(G.diagonal().max())
        w = MGDA()(G, _tasks(T))
        assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-12
        assert float((J.T @ w - J.T @ min_norm_qp(G)).norm()) <= 1e-9 * scale**0.5, (kind, T, seed)
        Gw = G @ w
        assert float(Gw.min() - w @ Gw) >= -1e-10 * scale, (kind, T, seed)


def test_frank_wolfe_mgda_is_torchjds_and_can_stop_far_from_the_min_norm_point():
    """MGDAFrankWolfe gives TorchJD's MGDA weights (same iteration, same stopping rule); on 5 tasks with unequal
    scales it stops short of the min-norm point, where MGDA does not."""
    import torchjd.aggregation as aggregation

    far = 0.0
    for seed in range(10):
        J = jacobian("scaled", 5, seed=seed)
        G = J @ J.T
        fw = MGDAFrankWolfe()(G, _tasks(5))
        assert torch.allclose(fw, aggregation.MGDAWeighting()(G), atol=1e-12)
        exact = min_norm_qp(G)
        far = max(far, float((J.T @ fw).norm() - (J.T @ exact).norm()) / float((J.T @ exact).norm()))
        assert float((J.T @ MGDA()(G, _tasks(5))).norm()) <= float((J.T @ exact).norm()) * (1 + 1e-9)
    assert far > 1e-3


def test_mgda_checks_its_parameters():
    with pytest.raises(ValueError, match="epsilon"):
        MGDAFrankWolfe(epsilon=0)
    with pytest.raises(ValueError, match="max_iters"):
        MGDAFrankWolfe(max_iters=0)


# ---------------------------------------------------------------------------------------------- PCGrad
def _pcgrad_on_vectors(J: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Yu et al., Algorithm 1, on the gradient vectors themselves, with the task orders drawn as PCGrad draws them
    (one random permutation of all tasks per task, skipping itself)."""
    total = torch.zeros(J.shape[1], dtype=J.dtype)
    for i in range(len(J)):
        g = J[i].clone()
        for j in torch.randperm(len(J), generator=generator).tolist():
            if j != i and g @ J[j] < 0:
                g = g - (g @ J[j]) / (J[j] @ J[j]) * J[j]
        total += g
    return total


@pytest.mark.parametrize("T", [2, 3, 6])
def test_pcgrad_equals_the_algorithm_on_the_vectors(T):
    pcgrad, generator = PCGrad(seed=5), torch.Generator().manual_seed(5)
    for step in range(3):  # the orders run on across steps
        J = jacobian("conflicting", T, seed=step)
        assert relative_error(J.T @ pcgrad(J @ J.T, _tasks(T)), _pcgrad_on_vectors(J, generator)) <= 1e-12


def test_pcgrad_without_conflict_is_the_sum():
    J = torch.rand(4, 9, dtype=torch.float64)  # non-negative rows: no pair conflicts
    assert torch.equal(PCGrad()(J @ J.T, _tasks(4)), torch.ones(4, dtype=torch.float64))


def test_pcgrad_leaves_the_global_random_state_alone():
    J = jacobian("conflicting", 5, seed=0)
    before = torch.get_rng_state()
    for _ in range(3):
        PCGrad(seed=1)(J @ J.T, _tasks(5))
    assert torch.equal(torch.get_rng_state(), before)


def test_pcgrad_state_round_trip_continues_the_orders():
    J = jacobian("conflicting", 5, seed=0)
    G = J @ J.T
    straight = PCGrad(seed=1)
    runs = [straight(G, _tasks(5)) for _ in range(6)]
    interrupted = PCGrad(seed=1)
    for _ in range(3):
        interrupted(G, _tasks(5))
    resumed = PCGrad(seed=99)
    resumed.load_state_dict(interrupted.state_dict())
    assert resumed.seed == 1
    assert all(torch.equal(resumed(G, _tasks(5)), expected) for expected in runs[3:])
    assert len({tuple(r.tolist()) for r in runs}) > 1  # the orders do change from step to step


# ---------------------------------------------------------------------------------------------- Nash-MTL
def test_nash_solution_solves_the_bargaining_equation():
    """Without clipping, on well-conditioned tasks, alpha_i (G alpha)_i = 1 (the authors' stopping tolerance)."""
    J = jacobian("random", 3, seed=4)
    G = J @ J.T
    alpha = NashMTL(max_norm=0.0)(G, _tasks(3))
    assert (alpha > 0).all()
    assert torch.allclose(alpha * (G @ alpha), torch.ones(3, dtype=torch.float64), atol=1e-2)


def test_nash_state_round_trip_and_update_every():
    """The warm start and the call count survive a state dict; with update_weights_every=2 the reused steps
    match TorchJD's aggregator with the same setting."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    Js = [jacobian("random", 3, seed=s) for s in range(6)]
    peer = aggregation.NashMTL(n_tasks=3, update_weights_every=2)
    straight = NashMTL(update_weights_every=2)
    updates = []
    for J in Js:
        ours = J.T @ straight(J @ J.T, _tasks(3))
        assert relative_error(ours, peer(J)) <= 1e-6
        updates.append(ours)
    interrupted = NashMTL(update_weights_every=2)
    for J in Js[:3]:
        interrupted(J @ J.T, _tasks(3))
    resumed = NashMTL(update_weights_every=2)
    resumed.load_state_dict(interrupted.state_dict())
    for J, expected in zip(Js[3:], updates[3:]):
        assert relative_error(J.T @ resumed(J @ J.T, _tasks(3)), expected) <= 1e-6


def test_nash_starts_afresh_when_the_tasks_change():
    J = jacobian("random", 3, seed=2)
    nash = NashMTL()
    nash(J @ J.T, _tasks(3))
    fresh = NashMTL()
    two = {"t0": 1.0, "t1": 1.0}
    assert torch.allclose(nash(J[:2] @ J[:2].T, two), fresh(J[:2] @ J[:2].T, two))
    assert nash.state_dict()["tasks"] == ["t0", "t1"]


# ---------------------------------------------------------------------------------------------- resolving
@pytest.mark.parametrize(
    ("spec", "name"),
    [("UPGrad", "upgrad"), ("imtlg", "imtl-g"), ("IMTL-G", "imtl-g"), ("Aligned_MTL", "aligned-mtl"),
     ("nash mtl", "nash-mtl"), ("DualProj", "dualproj"), ("cagrad", "cagrad"), ("MGDA", "mgda")],
)
def test_names_resolve_whatever_their_spelling(spec, name):
    assert make_weighting(spec).name == name


def test_bad_specs_are_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="unknown weighting 'gradnorm'.*upgrad"):
        make_weighting("gradnorm")
    with pytest.raises(TypeError, match="method name"):
        make_weighting(3)


def test_a_weighting_object_is_used_as_is():
    pcgrad = PCGrad(seed=4)
    assert make_weighting(pcgrad) is pcgrad


def test_functions_and_their_output_checks():
    G = torch.eye(2)
    assert make_weighting(lambda gram, losses: [1, 2])(G, _tasks(2)).tolist() == [1.0, 2.0]
    assert FunctionWeighting(lambda gram, losses: {"t1": 3, "t0": 1})(G, _tasks(2)).tolist() == [1.0, 3.0]
    for bad, message in (
        (lambda gram, losses: [1.0], "shape \\(1,\\) for 2 tasks"),
        (lambda gram, losses: [1.0, float("nan")], "non-finite"),
        (lambda gram, losses: {"t0": 1.0}, "no weight for task\\(s\\) \\['t1'\\]"),
        (lambda gram, losses: "heavy", "not T = 2 numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            FunctionWeighting(bad)(G, _tasks(2))
    with pytest.raises(ValueError, match="T x T"):
        FunctionWeighting(lambda gram, losses: [1.0])(torch.eye(2), _tasks(1))


def test_the_function_receives_the_gram_in_float64_and_the_losses_by_name():
    seen = {}

    def record(gram, losses):
        seen.update(dtype=gram.dtype, losses=losses)
        return torch.ones(len(losses))

    FunctionWeighting(record)(torch.eye(2, dtype=torch.float32), {"b": 0.5, "a": 2.0})
    assert seen == {"dtype": torch.float64, "losses": {"b": 0.5, "a": 2.0}}


def test_torchjd_weightings_and_aggregators_are_wrapped():
    aggregation = pytest.importorskip("torchjd.aggregation")
    J = jacobian("conflicting", 3, seed=0)
    G = J @ J.T
    for spec in (aggregation.UPGradWeighting(), aggregation.UPGrad()):
        wrapped = make_weighting(spec)
        assert isinstance(wrapped, TorchJDWeighting)
        assert relative_error(J.T @ wrapped(G, _tasks(3)), aggregation.UPGrad()(J)) <= 1e-6
    # a weighting of the matrix gets a factor of the Gram: TorchJD's Nash-MTL aggregator, as given
    nash = make_weighting(aggregation.NashMTL(n_tasks=3))
    assert relative_error(J.T @ nash(G, _tasks(3)), aggregation.NashMTL(n_tasks=3)(J)) <= 1e-6
    with pytest.raises(TypeError, match="not a TorchJD Weighting"):
        TorchJDWeighting(aggregation.GradDrop())


def test_preferences_are_given_by_task_name():
    aggregation = pytest.importorskip("torchjd.aggregation")
    J = jacobian("conflicting", 3, seed=1)
    pref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    weights = UPGrad(preference={"t2": 0.5, "t0": 0.2, "t1": 0.3})(J @ J.T, _tasks(3))
    assert relative_error(J.T @ weights, aggregation.UPGrad(pref_vector=pref)(J)) <= 1e-6
    with pytest.raises(ValueError, match="no weight to task\\(s\\) \\['t2'\\]"):
        UPGrad(preference={"t0": 1.0, "t1": 1.0})(J @ J.T, _tasks(3))


def test_a_stateless_weighting_refuses_a_state():
    with pytest.raises(ValueError, match="keeps no state"):
        MGDA().load_state_dict({"seed": 1})
    assert isinstance(MGDA(), Weighting) and MGDA().state_dict() == {}
