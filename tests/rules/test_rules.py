"""Layer rules one at a time: both Linear routes agree, the registry follows the class hierarchy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradconflict.rules import Call, rule_for
from gradconflict.rules.linear import LinearRule, ghost_is_cheaper


def test_cost_model_prefers_ghost_for_few_rows_and_wide_layers():
    assert ghost_is_cheaper(rows=64, d_in=512, d_out=512, tasks=4)
    assert not ghost_is_cheaper(rows=2048, d_in=256, d_out=256, tasks=4)


@pytest.mark.parametrize("rows", [3, 300])  # one takes the ghost route, the other the materialised one
def test_linear_routes_match_explicit_per_task_gradients(rows):
    torch.manual_seed(0)
    layer = nn.Linear(40, 30).double()
    X = torch.randn(rows, 40, dtype=torch.float64)
    D = torch.randn(4, rows, 30, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    out = LinearRule().compute(
        layer, [Call(layer, LinearRule(), X, grads=D)], {"weight", "bias"}, {"weight", "bias"}, w, torch.float64
    )
    per_task = torch.cat([torch.einsum("tno,ni->toi", D, X).flatten(1), D.sum(1)], dim=1)
    torch.testing.assert_close(out.gram, per_task @ per_task.T)
    torch.testing.assert_close(out.grads["weight"], torch.einsum("t,tno,ni->oi", w, D, X))
    torch.testing.assert_close(out.grads["bias"], torch.einsum("t,tno->o", w, D))
    assert out.route == ("ghost" if ghost_is_cheaper(rows, 40, 30, 4) else "materialised")


def test_registry_follows_subclasses_but_not_overridden_forwards():
    class Plain(nn.Linear):
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert isinstance(rule_for(Plain(2, 2)), LinearRule)
    assert rule_for(Custom(2, 2)) is None
    assert rule_for(nn.Embedding(3, 2, sparse=True)) is None
    assert rule_for(nn.BatchNorm1d(3)) is not None and rule_for(nn.SyncBatchNorm(3)) is None
