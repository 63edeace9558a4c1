"""Weighted updates where the tasks leave the backbone at different depths, and with a single task: every shared
parameter gets ``sum_i lambda_i w_i g_i`` (the explicit float64 Jacobian, T separate ``autograd.grad`` calls), with
``lambda`` equal to TorchJD's aggregator on that Jacobian (MGDA: the exact QP); every head gets its own ``w_i g_i``.
And MGDA's update never raises a task's loss to first order, on steps of 5 tasks with unequal loss scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradconflict import ConflictMonitor
from tests.weighting.peers import AGGREGATORS, relative_error

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore:Solution may be inaccurate"),
    pytest.mark.filterwarnings("ignore:.*not DPP"),
]

TOL = 1e-6
WEIGHTS = {"a": 1.0, "b": 0.5, "c": 2.0}
METHODS = ("mgda", "upgrad", "cagrad", "dualproj")


class Staircase(nn.Module):
    """Task ``a`` reads the backbone after its first layer, ``b`` after its second, ``c`` at its top: the upper
    shared layers are reached by fewer tasks (by one alone, for the top layer)."""

    def __init__(self, tasks: str, checkpointed: bool | None = None, segment: str = "module"):
        super().__init__()
        self.tasks = tasks
        self.checkpointed = checkpointed  # the top layer under checkpoint(use_reentrant=checkpointed); None: plain
        self.segment = segment  # what the checkpoint runs: the layer ("module") or a function that calls it
        self.backbone = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})

    def forward(self, x, y):
        depth = {"a": 1, "b": 2, "c": 3}
        h, losses = x, {}
        for k, layer in enumerate(self.backbone, start=1):
            top = k == len(self.backbone) and self.checkpointed is not None
            run = layer if self.segment == "module" else (lambda t, layer=layer: layer(t))
            h = torch.tanh(checkpoint(run, h, use_reentrant=self.checkpointed) if top else layer(h))
            for t in self.tasks:
                if depth[t] == k:
                    losses[t] = ((self.heads[t](h) - (k * y)) ** 2).mean() * k
        return losses


def _jacobian(losses, params):
    return torch.stack([
        torch.cat([g.flatten() for g in torch.autograd.grad(
            loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)])
        for loss in losses.values()
    ])


@pytest.mark.parametrize(
    ("name", "tasks", "checkpointed", "segment", "strategy"),
    [(name, tasks, None, "module", "auto") for name in METHODS for tasks in ("abc", "bc", "ac", "c", "a")]
    # the top layer, c's alone, checkpointed: a reentrant segment hides its parameters from the graph
    + [
        ("cagrad", "abc", reentrant, segment, strategy)
        for reentrant in (False, True)
        for segment in ("module", "function")
        for strategy in ("loop", "batched")
    ],
)
def test_every_shared_layer_gets_the_weighted_combination_at_every_depth(name, tasks, checkpointed, segment, strategy):
    torch.manual_seed(0)
    model = Staircase(tasks, checkpointed, segment)
    reference = Staircase(tasks)  # the same model unchecked: autograd.grad cannot go through a reentrant checkpoint
    reference.load_state_dict(model.state_dict())
    weights = {t: WEIGHTS[t] for t in tasks}
    shared = list(model.backbone.parameters())
    with ConflictMonitor(model, shared=model.backbone, strategy=strategy) as monitor:
        for step in range(2):
            model.zero_grad(set_to_none=True)
            x, y = torch.randn(16, 4), torch.randn(16, 1)
            losses, expected = model(x, y), reference(x, y)
            J = _jacobian(expected, list(reference.backbone.parameters()))
            heads = {t: torch.autograd.grad(expected[t], list(reference.heads[t].parameters()), retain_graph=True)
                     for t in tasks}
            report = monitor.backward(losses, weights=weights, weighting=name)
            assert not report.skipped
            w = torch.tensor([weights[t] for t in report.tasks])
            peer = AGGREGATORS[name](len(tasks))(w[:, None] * J)  # the method on the rows w_i g_i
            got = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in shared])
            assert relative_error(got, J.T @ report.weights) <= TOL, (name, tasks, step)
            assert relative_error(got, peer) <= TOL, (name, tasks, step)
            for t in tasks:
                for p, g in zip(model.heads[t].parameters(), heads[t]):
                    assert relative_error(p.grad, weights[t] * g) <= 1e-12, (t, step)


def test_one_task_gets_cagrads_amplified_gradient():
    """T = 1: CAGrad's weight is 1 + c = 1.4, and the backbone gets 1.4 g (it used to get the plain g)."""
    torch.manual_seed(0)
    model = Staircase("c")
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        losses = model(torch.randn(16, 4), torch.randn(16, 1))
        g = torch.autograd.grad(losses["c"], list(model.backbone.parameters()), retain_graph=True)
        report = monitor.backward(losses, weighting="cagrad")
    assert report.weights.tolist() == pytest.approx([1.4], abs=1e-9)
    for p, want in zip(model.backbone.parameters(), g):
        assert relative_error(p.grad, 1.4 * want) <= 1e-9


def _five_tasks() -> tuple[nn.Module, nn.Module, nn.ModuleDict]:
    backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    heads = nn.ModuleDict({f"t{i}": nn.Linear(16, 1) for i in range(5)})
    return nn.ModuleDict({"backbone": backbone, "heads": heads}), backbone, heads


def _alignments(method: str) -> torch.Tensor:
    torch.manual_seed(0)
    model, backbone, heads = _five_tasks()
    scales = torch.logspace(-2, 2, 5)  # loss scales over four decades
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    rows = []
    with ConflictMonitor(model, shared=backbone) as monitor:
        for _ in range(20):
            x = torch.randn(32, 6)
            h = backbone(x)
            losses = {t: s * ((head(h) - k) ** 2).mean() for k, ((t, head), s) in enumerate(zip(heads.items(), scales))}
            report = monitor.backward(losses, weighting=method)
            rows.append(report.alignment)
            optimizer.step()
            optimizer.zero_grad()
    return torch.stack(rows)


def test_mgda_never_raises_a_tasks_loss_on_five_unequal_tasks():
    """report.alignment >= 0 for every task on every step with the exact MGDA; TorchJD's Frank-Wolfe variant,
    stopped at a 1e-3 step, does raise some (which shows that this test can fail)."""
    assert bool((_alignments("mgda") >= 0).all())
    assert bool((_alignments("mgda-fw") < 0).any())


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_a_reentrant_segment_that_one_task_alone_reaches_is_measured(strategy):
    # Tasks a and b never reach the checkpointed top layer: the per-task loop used to ask autograd to materialise
    # their gradients at its unreached edges, which torch refuses, and every step was skipped.
    torch.manual_seed(0)
    model = Staircase("abc", checkpointed=True)
    reference = Staircase("abc")
    reference.load_state_dict(model.state_dict())
    with ConflictMonitor(model, shared=model.backbone, strategy=strategy) as monitor:
        for _ in range(2):
            x, y = torch.randn(16, 4), torch.randn(16, 1)
            model.zero_grad(set_to_none=True)
            report = monitor.backward(model(x, y))
            J = _jacobian(reference(x, y), list(reference.backbone.parameters()))
            assert not report.skipped and report.strategy == strategy
            assert relative_error(report.gram, J @ J.T) <= 1e-12


class _NoisyTop(nn.Module):
    """Task a leaves after the first layer; b alone reaches the top, a reentrant segment that runs a function
    (not a module) with dropout and a BatchNorm in training mode: looking into it must not move the RNG or the
    running statistics."""

    def __init__(self):
        super().__init__()
        self.bottom, self.top, self.norm = nn.Linear(4, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in "ab"})

    def forward(self, x):
        h = torch.tanh(self.bottom(x))
        u = checkpoint(lambda t: nn.functional.dropout(self.norm(self.top(t)), 0.3), h, use_reentrant=True)
        return {"a": self.heads["a"](h).pow(2).mean(), "b": self.heads["b"](u).pow(2).mean()}


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_looking_into_a_function_segment_leaves_rng_and_buffers_as_a_plain_step(strategy):
    torch.manual_seed(0)
    plain, monitored = _NoisyTop(), _NoisyTop()
    monitored.load_state_dict(plain.state_dict())
    x = torch.randn(16, 4)
    torch.manual_seed(1)
    sum(plain(x).values()).backward()
    after_plain = torch.get_rng_state()
    shared = [p for m in (monitored.bottom, monitored.top, monitored.norm) for p in m.parameters()]
    with ConflictMonitor(monitored, shared=shared, strategy=strategy) as monitor:
        torch.manual_seed(1)
        report = monitor.backward(monitored(x), weighting="cagrad")
    assert not report.skipped
    assert torch.equal(torch.get_rng_state(), after_plain)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(monitored.norm, name), getattr(plain.norm, name)), name
    # the top layer, b's alone, gets lambda_b g_b: CAGrad's lambda differs from 1 here, so the plain grad is off
    lam = report.weights[report.tasks.index("b")]
    assert abs(float(lam) - 1.0) > 0.1
    got = torch.cat([p.grad.flatten() for m in (monitored.top, monitored.norm) for p in m.parameters()])
    want = torch.cat([p.grad.flatten() for m in (plain.top, plain.norm) for p in m.parameters()])
    assert relative_error(got, lam * want) <= 1e-9  # (the top bias's gradient is zero: BatchNorm follows it)
