"""Monitor a data-parallel run: DistributedDataParallel on CPU (gloo), the exact Gram of the global batch.

Two tasks read the same readout of one shared backbone (the mean of its features): "up" wants it to equal a
target, "down" wants it to equal minus that target. Both cannot be met, so their gradients on the backbone point
against each other on every step (cosine near -1). Each rank trains on its own half of every batch; the
monitor all-reduces each layer's per-task gradients, so every rank prints the same, global report.

    torchrun --standalone --nproc_per_node=2 examples/ddp.py    # two processes on one machine
    python examples/ddp.py                                      # one process (DDP over a group of one)

Add ``--sync sketch`` (or ``local``) to compare the modes.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradconflict import ConflictMonitor


class Backbone(nn.Module):
    """A small shared backbone; both tasks read the mean of its features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync", default="exact", choices=["exact", "sketch", "local"])
    parser.add_argument("--steps", type=int, default=40)
    args, _ = parser.parse_known_args()
    launched = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    if launched:
        dist.init_process_group("gloo")
    else:
        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model on every rank
    model = DDP(Backbone())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    target = torch.randn(8, 1)

    with ConflictMonitor(model, sync=args.sync) as monitor:
        for step in range(args.steps):
            generator = torch.Generator().manual_seed(step)  # every rank draws the global batch, keeps its share
            x = torch.randn(64, 8, generator=generator).chunk(world)[rank]
            readout, y = model(x), (x @ target).squeeze(1)
            losses = {"up": (readout - y).pow(2).mean(), "down": (readout + y).pow(2).mean()}
            report = monitor.backward(losses)
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            print(f"{world} rank(s), sync={report.sync or 'none (one process)'}")
            print(report.summary())
            print("moving average of the cosine down/up:", round(monitor.history.ema["cosine/down/up"], 3))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
