"""The routed backward: shared parameters get ``sum_i s_i w_i g_i``, every task's own parameters the gradient of
``w_i L_i``, through one ordinary backward, checked against T separate ``autograd.grad`` calls in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradconflict.measure.tasks import task_losses
from gradconflict.weighting.routing import COMMON, owners, weighted_backward
from tests.zoo import FAMILIES, losses_of


def _reference(model, losses, weights, scales, shared):
    """Per-parameter expected gradient: shared ones sum_i s_i w_i g_i, the others sum_i w_i d(L_i)/dp."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_task = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        for loss in losses.values()
    ]
    ids = {id(p) for p in shared}
    return [
        sum((s if id(p) in ids else 1.0) * w * grads[k] for s, w, grads in zip(scales, weights, per_task))
        for k, p in enumerate(params)
    ]


@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer", "embedding_layernorm", "tied_weights", "deep_heads"])
def test_routed_backward_matches_the_per_task_reference(family):
    torch.manual_seed(0)
    model, x = FAMILIES[family](3)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    weights, scales = [1.0, 0.5, 2.0], [0.3, 0.0, 1.7]
    reference = _reference(model, losses_of(model(x)), weights, scales, list(model.backbone.parameters()))
    batch = task_losses(losses_of(model(x)), dict(zip(["t0", "t1", "t2"], weights)))
    weighted_backward(batch, scales, lambda total: total.backward())
    for (name, p), want in zip(model.named_parameters(), reference):
        assert torch.allclose(p.grad, want, rtol=1e-10, atol=1e-13), (family, name)


def test_owners_split_the_graph_at_the_shared_part():
    w, a, b = (torch.ones(2, requires_grad=True) for _ in range(3))
    h = w * 2
    la, lb = (h * a).sum(), (h * b).sum()
    owner = owners([la.grad_fn, lb.grad_fn])
    assert owner[h.grad_fn] == COMMON
    assert owner[la.grad_fn] == 0 and owner[lb.grad_fn] == 1
    leaves = {id(n.variable): t for n, t in owner.items() if getattr(n, "variable", None) is not None}
    assert leaves == {id(w): COMMON, id(a): 0, id(b): 1}


def test_one_loss_tensor_under_two_names_is_split_by_its_views():
    w = torch.ones(3, requires_grad=True)
    loss = (w * w).sum()
    batch = task_losses({"a": loss, "b": loss})
    leaves = weighted_backward(batch, [0.25, 0.5], lambda total: total.backward())
    assert torch.allclose(w.grad, 0.75 * 2 * w.detach())
    assert leaves == [w]


def test_a_loss_built_on_another_task_loss():
    """L_b = 3 L_a + c: L_a's node is reached by both tasks, so all of it is shared."""
    w, c = torch.ones(2, requires_grad=True), torch.ones(1, requires_grad=True)
    la = (w * 2).sum()
    lb = 3 * la + c.sum()
    weighted_backward(task_losses({"a": la, "b": lb}), [0.5, 0.1], lambda total: total.backward())
    assert torch.allclose(w.grad, torch.full((2,), 0.5 * 2 + 0.1 * 6))
    assert torch.allclose(c.grad, torch.ones(1))  # task b's own


def test_hooks_see_the_weighted_gradient_once_and_learned_weights_their_gradient():
    torch.manual_seed(0)
    backbone, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    learned = torch.tensor(2.0, requires_grad=True)
    h = backbone(torch.randn(5, 3))
    losses = {"a": heads[0](h).pow(2).mean(), "b": heads[1](h).mean()}
    g = [torch.autograd.grad(loss, backbone.weight, retain_graph=True)[0] for loss in losses.values()]
    seen, accumulated = [], []
    backbone.weight.register_hook(lambda g: seen.append(g.clone()))
    backbone.weight.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    batch = task_losses(losses, {"b": learned})
    weighted_backward(batch, [0.5, 0.25], lambda total: total.backward())
    expected = 0.5 * g[0] + 0.25 * 2.0 * g[1]
    assert len(seen) == 1 and len(accumulated) == 1
    assert torch.allclose(seen[0], expected) and torch.allclose(backbone.weight.grad, expected)
    assert torch.allclose(learned.grad, losses["b"].detach())  # d(total)/d(w_b) = L_b, as without a weighting


def test_hooks_are_removed_even_when_the_backward_fails():
    w = torch.ones(2, requires_grad=True)
    h = w * 2
    batch = task_losses({"a": (h * 3).sum(), "b": h.sum()})

    def fail(total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        weighted_backward(batch, [0.0, 0.0], fail)
    batch.total().backward()  # the same graph, no hook left: the plain sum
    assert torch.allclose(w.grad, torch.full((2,), 8.0))
