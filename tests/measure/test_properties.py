"""Properties that hold for every model, batch and weighting (Hypothesis draws them): the Gram is symmetric and
positive semi-definite, cosines lie in [-1, 1], scaling a loss by c scales its row and column by c, permuting the
tasks permutes the report, the layer Grams sum to G, and ``.grad`` equals autograd's."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradconflict import ConflictMonitor

LAYERS = {"linear": nn.Linear, "norm": nn.LayerNorm}


@st.composite
def problems(draw):
    """A random small multi-task model (Linear/LayerNorm/Conv1d backbone, heads of random depth), a batch, task
    weights and a scale for one loss."""
    seed = draw(st.integers(0, 2**16))
    T = draw(st.integers(2, 5))
    batch = draw(st.integers(1, 6))
    width = draw(st.integers(2, 9))
    depth = draw(st.integers(1, 3))
    conv = draw(st.booleans())
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if conv:
        layers += [nn.Conv1d(2, 3, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.LazyLinear(width)]
    else:
        layers += [nn.Linear(5, width)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.LayerNorm(width) if draw(st.booleans()) else nn.Linear(width, width)]
    backbone = nn.Sequential(*layers)
    heads = nn.ModuleDict(
        {
            f"task{i}": nn.Sequential(*[nn.Linear(width, width) for _ in range(draw(st.integers(0, 2)))],
                                      nn.Linear(width, 1))
            for i in range(T)
        }
    )
    model = nn.ModuleDict({"backbone": backbone, "heads": heads}).double()
    x = torch.randn(batch, 2, 4) if conv else torch.randn(batch, 5)
    x = x.double()
    backbone(x)  # materialise lazy layers
    weights = {f"task{i}": draw(st.floats(0.0, 3.0)) for i in range(T)}
    scale = draw(st.floats(0.1, 10.0))
    order = draw(st.permutations(list(range(T))))
    return model, x, weights, scale, order


def losses_for(model, x):
    h = model["backbone"](x)
    return {t: (head(h) - k).pow(2).mean() + head(h).sin().mean() for k, (t, head) in enumerate(model["heads"].items())}


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(problems())
def test_gram_is_symmetric_psd_with_cosines_in_range_and_layers_summing_to_it(problem):
    model, x, weights, _, _ = problem
    with ConflictMonitor(model) as monitor:
        report = monitor.backward(losses_for(model, x), weights=weights)
    G = report.gram
    torch.testing.assert_close(G, G.T, rtol=0, atol=0)
    assert torch.linalg.eigvalsh(G).min() >= -1e-10 * G.diagonal().max()
    assert ((report.cosine >= -1) & (report.cosine <= 1)).all()
    torch.testing.assert_close(sum(layer.gram for layer in report.layers.values()), G, rtol=1e-12, atol=0)
    assert 0 <= float(report.cancellation) <= 1


@SETTINGS
@given(problems())
def test_grad_equals_autograds_and_scaling_or_permuting_tasks_acts_on_the_report(problem):
    model, x, weights, scale, order = problem
    twin = copy.deepcopy(model)
    names = list(weights)
    with ConflictMonitor(model) as monitor:
        losses = losses_for(model, x)
        base = monitor.measure(losses)
        scaled = monitor.measure({t: loss * (scale if t == names[0] else 1.0) for t, loss in losses.items()})
        permuted = monitor.measure({names[k]: losses[names[k]] for k in order})
        monitor.backward(losses, weights=weights)
    twin_losses = losses_for(twin, x)
    sum(weights[t] * loss for t, loss in twin_losses.items()).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-300)
    c = torch.ones(len(names), dtype=torch.float64)
    c[0] = scale
    torch.testing.assert_close(scaled.gram, base.gram * torch.outer(c, c), rtol=1e-10, atol=1e-300)
    index = [permuted.tasks.index(t) for t in base.tasks]
    torch.testing.assert_close(permuted.gram[index][:, index], base.gram, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(permuted.cosine[index][:, index], base.cosine, rtol=1e-12, atol=1e-300)
