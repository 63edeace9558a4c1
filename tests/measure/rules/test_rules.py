"""Layer rules one at a time, against gradients autograd computes: both Linear routes, convolutions, embeddings
called twice, batch-norm state recorded at forward time; the registry follows the class hierarchy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradconflict.measure.rules.conv as conv_rules
import gradconflict.measure.rules.linear as linear_rules
from gradconflict.measure.rules import Call, rule_for
from gradconflict.measure.rules.conv import ConvRule
from gradconflict.measure.rules.embedding import EmbeddingRule
from gradconflict.measure.rules.linear import LinearRule, ghost_is_cheaper
from gradconflict.measure.rules.norm import BatchNormRule


def per_task_gram(outputs, params, D):
    """Oracle: autograd's per-task gradient of each task's output gradient, flattened, J @ J.T."""
    rows = []
    for d in D:
        grads = torch.autograd.grad(outputs, params, d, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    J = torch.stack(rows)
    return J @ J.T


def test_cost_model_prefers_ghost_for_few_rows_and_wide_layers():
    assert ghost_is_cheaper(rows=64, d_in=512, d_out=512, tasks=4)
    assert not ghost_is_cheaper(rows=2048, d_in=256, d_out=256, tasks=4)


@pytest.mark.parametrize("rows", [3, 300])  # one takes the ghost route, the other the materialised one
def test_linear_routes_match_autograd(rows):
    layer = nn.Linear(40, 30).double()
    X = torch.randn(rows, 40, dtype=torch.float64)
    y = layer(X)
    D = torch.randn(4, rows, 30, dtype=torch.float64)
    out = LinearRule().gram(layer, [Call(layer, LinearRule(), X, grads=D)], {"weight", "bias"}, torch.float64)
    torch.testing.assert_close(out.gram, per_task_gram(y, [layer.weight, layer.bias], D))
    assert out.route == ("ghost" if ghost_is_cheaper(rows, 40, 30, 4) else "materialised")


def test_registry_follows_subclasses_but_not_overridden_forwards():
    class Plain(nn.Linear):
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert isinstance(rule_for(Plain(2, 2)), LinearRule)
    assert rule_for(Custom(2, 2)) is None
    assert rule_for(nn.Embedding(3, 2, max_norm=1.0)) is None and rule_for(nn.Embedding(3, 2, sparse=True)) is not None
    assert rule_for(nn.BatchNorm1d(3)) is not None and rule_for(nn.SyncBatchNorm(3)) is None


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_rule_matches_autograd(groups):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    y = conv(x)
    D = torch.randn(5, *y.shape, dtype=torch.float64)
    rule = ConvRule()
    out = rule.gram(conv, [Call(conv, rule, rule.save(conv, x, y), grads=D)], {"weight", "bias"}, torch.float64)
    torch.testing.assert_close(out.gram, per_task_gram(y, [conv.weight, conv.bias], D))


def test_embedding_scaled_by_frequency_and_called_twice_matches_autograd():
    # autograd scales each call's rows by the id counts of that call alone
    emb = nn.Embedding(7, 3, scale_grad_by_freq=True, padding_idx=0).double()
    ids = [torch.tensor([[1, 2, 2, 0], [3, 1, 1, 1]]), torch.tensor([[2, 2, 5, 6]])]
    ys = [emb(i) for i in ids]
    D = [torch.randn(3, *y.shape, dtype=torch.float64) for y in ys]
    rule = EmbeddingRule()
    calls = [Call(emb, rule, rule.save(emb, i, y), grads=d) for i, y, d in zip(ids, ys, D)]
    out = rule.gram(emb, calls, {"weight"}, torch.float64)
    rows = []
    for t in range(3):
        (g,) = torch.autograd.grad(ys, [emb.weight], [d[t] for d in D], retain_graph=True)
        rows.append(g.flatten())
    J = torch.stack(rows)
    torch.testing.assert_close(out.gram, J @ J.T)


def test_batchnorm_uses_the_mode_and_statistics_of_its_forward():
    bn = nn.BatchNorm1d(4).double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    rule = BatchNormRule()
    for training in (True, False):
        bn.train(training)
        x = torch.randn(6, 4, dtype=torch.float64)
        y = bn(x)
        D = torch.randn(3, *y.shape, dtype=torch.float64)
        expected = per_task_gram(y, [bn.weight, bn.bias], D)
        call = Call(bn, rule, rule.save(bn, x, y), grads=D)
        bn.train(not training)  # the mode flips between forward and backward: the forward's is the one used
        with torch.no_grad():
            bn.running_mean.add_(1.0)  # and the statistics move on
        out = rule.gram(bn, [call], {"weight", "bias"}, torch.float64)
        torch.testing.assert_close(out.gram, expected)


def test_per_task_gradients_of_every_rule_match_autograd():
    """What the exact cross-process mode all-reduces: each rule's per-task parameter gradients."""
    torch.manual_seed(0)
    cases = [
        (nn.Linear(5, 4).double(), torch.randn(3, 2, 5, dtype=torch.float64)),
        (nn.Conv2d(2, 4, 3, padding=1, groups=2).double(), torch.randn(2, 2, 5, 5, dtype=torch.float64)),
        (nn.Embedding(7, 3, scale_grad_by_freq=True).double(), torch.tensor([[1, 2, 2], [6, 1, 0]])),
        (nn.BatchNorm1d(4).double(), torch.randn(6, 4, dtype=torch.float64)),
        (nn.LayerNorm(4).double(), torch.randn(3, 4, dtype=torch.float64)),
    ]
    for module, x in cases:
        rule = rule_for(module)
        y = module(x)
        D = torch.randn(3, *y.shape, dtype=torch.float64)
        names = set(rule.params(module))
        got = rule.per_task(module, [Call(module, rule, rule.save(module, x, y), grads=D)], names, torch.float64)
        for name in names:
            expected = torch.stack([torch.autograd.grad(y, getattr(module, name), d, retain_graph=True)[0] for d in D])
            torch.testing.assert_close(got[name], expected, msg=f"{type(module).__name__}.{name}")


def test_hugging_face_conv1d_is_a_transposed_linear():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from gradconflict.measure.rules.linear import TransposedLinearRule

    torch.manual_seed(0)
    layer = Conv1D(4, 5).double()  # nf=4 outputs, nx=5 inputs
    rule = rule_for(layer)
    assert isinstance(rule, TransposedLinearRule)
    for rows in (2, 300):  # the ghost and the materialised routes
        x = torch.randn(rows, 5, dtype=torch.float64)
        y = layer(x)
        D = torch.randn(3, *y.shape, dtype=torch.float64)
        call = Call(layer, rule, rule.save(layer, x, y), grads=D)
        torch.testing.assert_close(rule.gram(layer, [call], {"weight", "bias"}, torch.float64).gram,
                                   per_task_gram(y, [layer.weight, layer.bias], D))
        got = rule.per_task(layer, [call], {"weight"}, torch.float64)["weight"]
        expected = torch.stack([torch.autograd.grad(y, layer.weight, d, retain_graph=True)[0] for d in D])
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("route", ["per-example", "kernel"])
def test_conv_attribution_against_given_gradients_matches_autograd(route, monkeypatch):
    # Across processes each example is attributed against the global per-task gradients: here an arbitrary
    # ``total`` stands for them. The oracle: each example's weight and bias gradients by autograd, one at a time.
    monkeypatch.setattr(conv_rules, "kernel_is_cheaper", lambda *args: route == "kernel")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    y = conv(x)
    D = torch.randn(2, *y.shape, dtype=torch.float64)
    total = {"weight": torch.randn(2, *conv.weight.shape, dtype=torch.float64),
             "bias": torch.randn(2, 6, dtype=torch.float64)}
    rule = ConvRule()
    call = Call(conv, rule, rule.save(conv, x, y), grads=D)
    out = rule.attribute(conv, [call], {"weight", "bias"}, torch.float64, total)
    expected = torch.zeros(3, 2, 2, dtype=torch.float64)
    for n in range(3):
        for i in range(2):
            gw, gb = torch.autograd.grad((conv(x[n : n + 1]) * D[i, n : n + 1]).sum(), [conv.weight, conv.bias])
            for j in range(2):
                expected[n, i, j] = (gw * total["weight"][j]).sum() + (gb * total["bias"][j]).sum()
    torch.testing.assert_close(out.contribution, expected)
    rows = torch.cat([total["weight"].flatten(1), total["bias"]], dim=1)
    torch.testing.assert_close(out.gram, rows @ rows.T)


@pytest.mark.parametrize("route", ["materialised", "per-example"])
def test_linear_attribution_against_given_gradients_matches_autograd(route, monkeypatch):
    # As for the convolution: an arbitrary ``total`` stands for the global per-task gradients, and each example's
    # weight and bias gradients come from autograd, one example at a time (three rows each, a layer called twice).
    monkeypatch.setattr(linear_rules, "attribution_route", lambda *args: route)
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    rule = LinearRule()
    x1, x2 = torch.randn(3, 3, 5, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
    y1, y2 = layer(x1), layer(x2)
    D1, D2 = torch.randn(2, *y1.shape, dtype=torch.float64), torch.randn(2, *y2.shape, dtype=torch.float64)
    calls = [Call(layer, rule, rule.save(layer, x, y), grads=D) for x, y, D in ((x1, y1, D1), (x2, y2, D2))]
    total = {"weight": torch.randn(2, 4, 5, dtype=torch.float64), "bias": torch.randn(2, 4, dtype=torch.float64)}
    out = rule.attribute(layer, calls, {"weight", "bias"}, torch.float64, total)
    assert out.route == route
    expected = torch.zeros(3, 2, 2, dtype=torch.float64)
    for n in range(3):
        for i in range(2):
            outputs = (layer(x1[n]) * D1[i, n]).sum() + (layer(x2[n]) * D2[i, n]).sum()
            gw, gb = torch.autograd.grad(outputs, [layer.weight, layer.bias])
            for j in range(2):
                expected[n, i, j] = (gw * total["weight"][j]).sum() + (gb * total["bias"][j]).sum()
    torch.testing.assert_close(out.contribution, expected)
    rows = torch.cat([total["weight"].flatten(1), total["bias"]], dim=1)
    torch.testing.assert_close(out.gram, rows @ rows.T)
