"""Per-rank decisions that change which collectives a measured step runs are made alike on every rank (gloo, 2
processes on CPU). ``strategy="auto"`` times the batched pass and the per-task loop on each rank's own clock; the
two strategies all-reduce different blocks, so ranks that settled on different ones would hang or fail in a
collective. Here each rank's clock is made to disagree (rank 0 finds the batched pass faster, rank 1 the loop):
both ranks must settle on the candidate whose slowest rank is fastest, finish every step, write DDP's own
``.grad`` and report the global batch's Gram (a one-process float64 oracle); so must a rank that alone meets a
new batch shape. A batched pass that fails midway on every rank falls back to the loop with the step's reductions
started over, not added twice; a failed collective is raised, never taken for an op the loop could measure."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradconflict import ConflictMonitor, MeasurementWarning
from gradconflict.measure.distributed import sketch_std
from gradconflict.measure.engine import batched, tapped
from gradconflict.measure.engine.tapped import TRIALS, TappedEngine
from tests.measure.test_distributed import WORLD, batches, rel_err, spawn
from tests.zoo import FAMILIES, losses_of, reference

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

#: Seconds each strategy takes on each rank's (fake) clock: each rank alone would choose differently.
COSTS = [{"batched": 1.0, "loop": 2.0}, {"batched": 5.0, "loop": 3.0}]
#: The candidate whose slowest rank is fastest (a data-parallel step waits for its slowest rank).
AGREED = min(COSTS[0], key=lambda c: max(cost[c] for cost in COSTS))
STEPS = 2 * TRIALS + 2  # the trial steps, the step that settles the choice, and one after it


def _check_gram(report, expected, sync: str) -> None:
    if sync == "exact":
        assert rel_err(report.gram, expected.gram) <= 1e-9
    else:  # the sketch's documented bound, 5 standard deviations
        n = expected.gram.diagonal().sqrt()
        assert ((report.gram - expected.gram).abs() <= 5 * sketch_std(4096) * torch.outer(n, n)).all()


def fake_clocks(patch: pytest.MonkeyPatch, costs: dict[str, float]) -> None:
    """Make the engine's clock advance by ``costs[strategy]`` seconds each time a strategy runs."""
    clock = SimpleNamespace(now=0.0)
    batched, loop = TappedEngine._batched, tapped.loop_accumulate

    def slow_batched(self, *args, **kwargs):
        clock.now += costs["batched"]
        return batched(self, *args, **kwargs)

    def slow_loop(*args, **kwargs):
        clock.now += costs["loop"]
        return loop(*args, **kwargs)

    patch.setattr(tapped, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    patch.setattr(TappedEngine, "_batched", slow_batched)
    patch.setattr(tapped, "loop_accumulate", slow_loop)


def run_steps(rank: int, sync: str, costs: dict[str, float], sizes: list[list[int]]) -> tuple[list[str], dict]:
    """Train one step per entry of ``sizes`` (each rank's batch sizes), checking each step's ``.grad`` against DDP's
    plain backward and its Gram against the oracle's; returns the steps' strategies and the monitor's plan."""
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model)
    ddp, ddp_twin = DDP(model), DDP(twin)
    strategies = []
    with pytest.MonkeyPatch.context() as patch, ConflictMonitor(ddp, sync=sync, strategy="auto") as monitor:
        fake_clocks(patch, costs)
        for step, split in enumerate(sizes):
            parts = batches(x, split, seed=step)
            model.zero_grad()
            twin.zero_grad()
            report = monitor.backward(losses_of(ddp(parts[rank])))
            sum(losses_of(ddp_twin(parts[rank])).values()).backward()
            for (name, a), b in zip(model.named_parameters(), twin.parameters()):
                assert torch.equal(a.grad, b.grad), (step, name)
            # DDP averages the ranks' gradients: the global losses are the mean of the per-rank mean losses
            per_rank = [losses_of(oracle(p)) for p in parts]
            _check_gram(report, reference(oracle, {t: sum(d[t] for d in per_rank) / WORLD for t in per_rank[0]}), sync)
            strategies.append(report.strategy)
        return strategies, monitor.plan


def _disagreeing_clocks(rank: int, folder: str, sync: str) -> None:
    assert {min(cost, key=cost.__getitem__) for cost in COSTS} == {"batched", "loop"}  # alone, they would differ
    strategies, plan = run_steps(rank, sync, COSTS[rank], [[4, 4]] * STEPS)
    assert strategies == ["batched", "loop"] * TRIALS + [AGREED] * 2
    everyone: list = [None] * WORLD
    dist.all_gather_object(everyone, (strategies, plan))
    assert everyone[0] == everyone[1]  # the same choice, from the same agreed times, on every rank
    (choice,) = plan["choices"]
    assert choice["strategy"] == AGREED
    assert choice["seconds"] == {c: max(cost[c] for cost in COSTS) for c in ("batched", "loop")}


def _a_new_shape_on_one_rank(rank: int, folder: str) -> None:
    # both ranks settle on the loop; then rank 1 alone meets a new batch shape (an uneven last batch)
    strategies, _ = run_steps(rank, "exact", {"batched": 2.0, "loop": 1.0}, [[4, 4]] * (STEPS - 1) + [[4, 3]])
    assert strategies == ["batched", "loop"] * TRIALS + ["loop"] * 2


def _batched_fails_midway(rank: int, folder: str) -> None:
    compute = batched.BatchedPass._compute

    def fail_after_one_layer(self, module):
        compute(self, module)  # this layer's gradients are all-reduced, then the pass fails, on every rank
        raise RuntimeError("no batched backward for this op")

    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model)
    ddp, ddp_twin = DDP(model), DDP(twin)
    parts = batches(x, [4, 4])
    with pytest.MonkeyPatch.context() as patch, ConflictMonitor(ddp, strategy="batched") as monitor:
        patch.setattr(batched.BatchedPass, "_compute", fail_after_one_layer)
        with pytest.warns(UserWarning, match="the batched backward failed"):
            report = monitor.backward(losses_of(ddp(parts[rank])))
    sum(losses_of(ddp_twin(parts[rank])).values()).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert report.strategy == "loop" and not report.skipped
    _check_gram(report, reference(oracle, losses_of(oracle(torch.cat(parts)))), "exact")


def _a_failed_collective(rank: int, folder: str) -> None:
    def collective_fails(self, module):
        raise dist.DistBackendError("a collective failed")

    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    ddp = DDP(model)
    with pytest.MonkeyPatch.context() as patch, ConflictMonitor(ddp, strategy="batched") as monitor:
        patch.setattr(batched.BatchedPass, "_compute", collective_fails)
        with pytest.raises(dist.DistBackendError):  # raised, not taken for an op without a batched backward
            monitor.backward(losses_of(ddp(x)))
    assert all(p.grad is None for p in model.parameters())


class _Expert(nn.Module):
    """A shared bottom layer and an "expert" layer that a step may leave unused on some ranks (rank 0 uses it on
    every step, rank 1 from step 1 on): DDP trains it with ``find_unused_parameters=True``."""

    def __init__(self):
        super().__init__()
        self.bottom, self.expert = nn.Linear(4, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])

    def forward(self, x, use_expert):
        h = torch.tanh(self.bottom(x))
        h = torch.tanh(self.expert(h)) if use_expert else h
        return {"a": self.heads[0](h).pow(2).mean(), "b": (self.heads[1](h) - 1).pow(2).mean()}


def _an_expert_unused_on_one_rank(rank: int, folder: str, strategy: str, given: bool) -> None:
    torch.manual_seed(0)
    model = _Expert()
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model)
    ddp, ddp_twin = DDP(model, find_unused_parameters=True), DDP(twin, find_unused_parameters=True)
    shared = [*model.bottom.parameters(), *model.expert.parameters()] if given else None
    with ConflictMonitor(ddp, shared=shared, strategy=strategy) as monitor:
        for step in range(3):
            parts = batches(torch.zeros(1, 4), [4, 4], seed=step)
            use = [True, step > 0]  # each rank's choice
            model.zero_grad()
            twin.zero_grad()
            if step == 0:
                with pytest.warns(MeasurementWarning, match="different shared (layers|parameters)"):
                    report = monitor.backward(ddp(parts[rank], use[rank]))
            else:
                report = monitor.backward(ddp(parts[rank], use[rank]))
            sum(ddp_twin(parts[rank], use[rank]).values()).backward()
            for (name, a), b in zip(model.named_parameters(), twin.parameters()):
                assert torch.equal(a.grad, b.grad), (step, name)
            if step == 0 or not given:  # with shared=None, rank 1 found its shared parameters without the expert
                assert report.skipped, step
                continue
            assert not report.skipped
            per_rank = [oracle(p, u) for p, u in zip(parts, use)]
            params = [*oracle.bottom.parameters(), *oracle.expert.parameters()]
            J = torch.stack([  # the global losses are the mean of the ranks' (DDP averages the gradients)
                torch.cat([g.flatten() for g in torch.autograd.grad(
                    sum(d[t] for d in per_rank) / WORLD, params, retain_graph=True)])
                for t in report.tasks
            ])
            assert rel_err(report.gram, J @ J.T) <= 1e-9


def _an_expert_unused_in_one_ranks_micro_batches(rank: int, folder: str) -> None:
    # accumulation_steps=2: in the first group rank 1's micro-batches never reach the expert; in the second they do
    torch.manual_seed(0)
    model = _Expert()
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model)
    ddp, ddp_twin = DDP(model, find_unused_parameters=True), DDP(twin, find_unused_parameters=True)
    params = [*oracle.bottom.parameters(), *oracle.expert.parameters()]
    with ConflictMonitor(ddp, shared=[*model.bottom.parameters(), *model.expert.parameters()],
                         accumulation_steps=2) as monitor:
        for group in range(2):
            micro = batches(torch.zeros(1, 4), [3, 3, 3, 3], seed=group)  # 2 micro-batches per rank
            use = [True, group > 0]
            model.zero_grad()
            twin.zero_grad()
            for net, plain in ((ddp, False), (ddp_twin, True)):
                for m in range(2):
                    with net.no_sync() if m == 0 else contextlib.nullcontext():
                        losses = net(micro[2 * rank + m], use[rank])
                        if plain:
                            sum(losses.values()).backward()
                        elif m == 0:
                            assert monitor.backward(losses) is None
                        elif group == 0:
                            with pytest.warns(MeasurementWarning, match="different shared layers"):
                                report = monitor.backward(losses)
                        else:
                            report = monitor.backward(losses)
            for (name, a), b in zip(model.named_parameters(), twin.parameters()):
                assert torch.equal(a.grad, b.grad), (group, name)
            assert report.skipped == (group == 0)
            if group == 1:
                per_rank = [oracle(m, use[r]) for r in range(WORLD) for m in micro[2 * r : 2 * r + 2]]
                J = torch.stack([
                    torch.cat([g.flatten() for g in torch.autograd.grad(
                        sum(d[t] for d in per_rank) / WORLD, params, retain_graph=True)])
                    for t in report.tasks
                ])
                assert rel_err(report.gram, J @ J.T) <= 1e-9


def test_ranks_whose_micro_batches_reach_different_shared_layers_skip_the_group_alike(tmp_path):
    spawn(_an_expert_unused_in_one_ranks_micro_batches, tmp_path, timeout=60)


@pytest.mark.parametrize("strategy", ["batched", "loop"])
@pytest.mark.parametrize("given", [True, False])
def test_ranks_whose_graphs_reach_different_shared_layers_skip_the_step_alike(tmp_path, strategy, given):
    # each rank would otherwise all-reduce a different list of layers: a failed (gloo) or hung (NCCL) collective
    spawn(_an_expert_unused_on_one_rank, tmp_path, strategy, given, timeout=60)


@pytest.mark.parametrize("sync", ["exact", "sketch"])
def test_ranks_whose_clocks_disagree_settle_on_one_strategy(tmp_path, sync):
    spawn(_disagreeing_clocks, tmp_path, sync, timeout=60)


def test_a_batch_shape_new_to_one_rank_keeps_the_agreed_strategy(tmp_path):
    spawn(_a_new_shape_on_one_rank, tmp_path, timeout=60)


def test_a_batched_pass_failing_midway_on_every_rank_is_measured_again_by_the_loop(tmp_path):
    spawn(_batched_fails_midway, tmp_path, timeout=60)


def test_a_failed_collective_inside_the_batched_pass_is_raised_not_measured_by_the_loop(tmp_path):
    spawn(_a_failed_collective, tmp_path, timeout=60)
