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


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_rule_per_task_and_update_match_autograd(groups):
    from gradconflict.rules.conv import ConvRule

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    y = conv(x)
    D = torch.randn(5, *y.shape, dtype=torch.float64)
    w = torch.rand(5, dtype=torch.float64)
    per_task = [torch.autograd.grad(y, [conv.weight, conv.bias], d, retain_graph=True) for d in D]
    flat = torch.stack([torch.cat([gw.flatten(), gb]) for gw, gb in per_task])
    rule = ConvRule()
    call = Call(conv, rule, rule.save(conv, (x,), y), grads=D)
    for shared in ({"weight", "bias"}, set()):  # a shared layer, then a head: the update alone
        out = rule.compute(conv, [call], {"weight", "bias"}, shared, w, torch.float64)
        torch.testing.assert_close(out.grads["weight"], sum(wi * g[0] for wi, g in zip(w, per_task)))
        torch.testing.assert_close(out.grads["bias"], sum(wi * g[1] for wi, g in zip(w, per_task)))
        if shared:
            torch.testing.assert_close(out.gram, flat @ flat.T)
        else:
            assert out.gram is None
