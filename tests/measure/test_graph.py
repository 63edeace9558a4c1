"""Walks of the autograd graph."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradconflict.measure.graph import CHECKPOINT_NODE, depends_on, leaves_of, walk_graph


def test_uses_look_through_casts_and_views():
    w = torch.ones(3, 2, requires_grad=True)
    x = torch.ones(4, 2)
    tied = x @ w.T + (x @ w.T.double().float())  # used twice, once through a cast
    assert walk_graph([tied.sum()]).uses[id(w)] == 2
    assert walk_graph([(x @ w.T).sum()]).uses[id(w)] == 1


def test_reentrant_checkpoints_and_compiled_regions_are_reported():
    block = nn.Linear(2, 2)
    x = torch.ones(1, 2, requires_grad=True)
    y = checkpoint(block, x * 2, use_reentrant=True)
    graph = walk_graph([y.sum()])
    assert [type(n).__name__ for n in graph.checkpoints] == [CHECKPOINT_NODE]
    assert id(block.weight) not in {id(t) for t in graph.leaves}  # hidden inside the segment ...
    expanded = leaves_of(y.sum(), lambda node: list(block.parameters()))
    assert any(t is block.weight for t in expanded)  # ... unless expanded
    assert depends_on(y.sum(), [block.bias], lambda node: list(block.parameters()))
    assert not depends_on(y.sum(), [block.bias])
