"""Checkpoints under measurement: the segment's parameters, recomputation with the forward's RNG, buffers put back;
and the Gram of checkpointed steps (``use_reentrant`` both ways, every route) against T plain backward passes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradconflict import ConflictMonitor
from gradconflict.measure.checkpoint import BufferGuard, recompute, segment_leaves
from gradconflict.measure.graph import walk_graph
from tests.zoo import backward_reference


def test_segment_leaves_of_a_module_and_of_a_function_without_side_effects():
    block = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    x = torch.randn(4, 3, requires_grad=True)
    for run in (block, lambda t: block(t) * 2):
        y = checkpoint(run, x, use_reentrant=True)
        (node,) = walk_graph([y.sum()]).checkpoints
        stats = block[1].running_mean.clone()
        rng = torch.get_rng_state()
        leaves = segment_leaves(node, block)
        assert {id(t) for t in leaves} == {id(p) for p in block.parameters()}
        assert torch.equal(block[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)


def test_recompute_replays_the_forwards_dropout():
    block = nn.Dropout(0.5)
    x = torch.randn(50, requires_grad=True)
    y = checkpoint(lambda t: block(t) + 0, x, use_reentrant=True)
    (node,) = walk_graph([y.sum()]).checkpoints
    _, outputs = recompute(node)
    assert torch.equal(outputs[0], y)


def test_buffer_guard_restores_without_bumping_versions():
    bn = nn.BatchNorm1d(2)
    before = bn.running_mean.clone()
    version = bn.running_mean._version
    with BufferGuard(bn):
        bn(torch.randn(5, 2))
    assert torch.equal(bn.running_mean, before) and bn.running_mean._version == version


class Checkpointed(nn.Module):
    """Two checkpointed blocks (dropout and BatchNorm inside: RNG and buffers matter) under three heads."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.GELU()) for _ in range(2)
        )
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x):
        torch.manual_seed(1)  # the same dropout masks in every copy
        h = self.inp(x)
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=self.reentrant)
        return {f"t{k}": ((head(h) - k) ** 2).mean() * (k + 1) for k, head in enumerate(self.heads)}


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("route", ["batched", "loop", "reference"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_gram_equals_plain_backward_passes(reentrant, route):
    """The oracle knows nothing of the library's engines: one plain ``backward()`` per task on a fresh copy. The
    buffers end the measurement as one plain forward leaves them."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    x = torch.randn(6, 5)

    def shared(m):
        return [*m.inp.parameters(), *m.blocks.parameters()]

    expected = backward_reference(model, lambda m: m(x), shared)
    plain = copy.deepcopy(model)
    plain(x)
    options = {"engine": "reference"} if route == "reference" else {"strategy": route}
    with ConflictMonitor(model, shared=shared(model), **options) as monitor:
        report = monitor.measure(model(x))
    assert report.strategy == route
    assert float((report.gram - expected).abs().max()) <= 1e-9 * float(expected.abs().max())
    assert {"inp", "blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1"} == set(report.layers)
    for (name, a), b in zip(model.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name
