"""A weighted step under ``DistributedDataParallel`` (gloo, 2 processes on CPU): one ordinary backward, so DDP's
reducer averages the ranks' weighted updates (each weighted by the weights of the Gram its monitor reports), and
the ranks stay in step."""

from __future__ import annotations

import copy
import gc
import os
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gradconflict import ConflictMonitor
from tests.zoo import FAMILIES, losses_of

WORLD = 2


def _in_process_group(rank: int, init_file: str, check: Callable[[int], None]) -> None:
    """Run ``check(rank)`` on one of ``WORLD`` gloo ranks, then leave the group."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        check(rank)
    finally:
        # free the DDP wrappers (their reducers hold the group; the monitor's references keep them in cycles)
        # before the group goes: freed at exit instead, a reducer aborts the process now and then
        gc.collect()
        dist.destroy_process_group()


def _weighted_ddp_step(rank: int) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    alone = copy.deepcopy(model)
    ddp = DDP(model)
    torch.manual_seed(100 + rank)  # each rank its own batch
    batch = torch.randn_like(x)
    with ConflictMonitor(ddp) as monitor:
        report = monitor.backward(losses_of(ddp(batch)), weighting="mgda")
    # the oracle: this rank's per-task gradients weighted by the weights its report gives (heads: their own),
    # averaged over the ranks by hand
    losses = losses_of(alone(batch))
    params = list(alone.parameters())
    per_task = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        for loss in losses.values()
    ]
    shared = {id(p) for p in alone.backbone.parameters()}
    weights = report.weights.tolist()
    for k, ((name, p), q) in enumerate(zip(model.named_parameters(), params)):
        local = sum((w if id(q) in shared else 1.0) * grads[k] for w, grads in zip(weights, per_task))
        dist.all_reduce(local)
        assert torch.allclose(p.grad, local / WORLD, rtol=1e-5, atol=1e-8), name
        other = p.grad.clone()
        dist.broadcast(other, src=0)
        assert torch.equal(p.grad, other), name  # the ranks agree


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_averages_each_ranks_weighted_update(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_in_process_group, args=(str(tmp_path / "init"), _weighted_ddp_step), nprocs=WORLD, join=True)
