"""Reentrant checkpoints under measurement: the segment's parameters, recomputation with the forward's RNG,
buffers put back."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradconflict.measure.checkpoint import BufferGuard, recompute, segment_leaves
from gradconflict.measure.graph import walk_graph


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
