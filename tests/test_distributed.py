"""Data-parallel training: under ``DistributedDataParallel`` (gloo, 2 processes on CPU) a monitored step leaves
every rank with the ``.grad`` that DDP's own backward gives: averaged over the ranks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gradconflict import ConflictMonitor
from tests.zoo import FAMILIES, losses_of

WORLD = 2


def _ddp_step(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model, x = FAMILIES["cnn"](3)
        twin = copy.deepcopy(model)
        ddp, ddp_twin = DDP(model), DDP(twin)
        torch.manual_seed(100 + rank)  # each rank its own batch
        batches = [torch.randn_like(x) for _ in range(2)]
        with ConflictMonitor(ddp) as monitor:
            for b in batches:
                report = monitor.backward(losses_of(ddp(b)))
            assert not report.skipped and "backbone.0" in report.layers  # names without the "module." prefix
        for b in batches:
            sum(losses_of(ddp_twin(b)).values()).backward()
        for (name, a), t in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(a.grad, t.grad), name
        # and the ranks agree: the gradients were averaged
        for p in model.parameters():
            other = p.grad.clone()
            dist.broadcast(other, src=0)
            assert torch.equal(p.grad, other)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_monitored_step_gives_ddp_gradients(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_step, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
