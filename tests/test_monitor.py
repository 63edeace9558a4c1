"""ConflictMonitor's contract: .grad like autograd, bad input rejected with nothing changed, every=k, hooks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from gradconflict import ConflictMonitor, History
from tests.zoo import FAMILIES, losses_of


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b)
    )


@pytest.fixture
def setup():
    model, x = FAMILIES["mlp"](3)
    monitor = ConflictMonitor(model, shared=model.backbone)
    yield model, x, monitor
    monitor.close()


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "make_losses, message",
    [
        (lambda out: {}, "non-empty"),
        (lambda out: {"t0": out["t0"], "t1": out["t1"].mean()}, "shape"),
        (lambda out: {"t0": out["t0"].mean(), "t1": 3.0}, "not a tensor"),
        (lambda out: {"t0": out["t0"].mean(), "t1": out["t1"].detach().mean()}, "does not require grad"),
        (lambda out: {"t0": out["t0"].mean(), "t1": torch.ones((), device="meta", requires_grad=True)}, "devices"),
    ],
)
def test_bad_losses_raise_and_change_nothing(setup, make_losses, message):
    model, x, monitor = setup
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = grads_of(model)
    with pytest.raises((ValueError, TypeError), match=message):
        monitor.backward(make_losses(model(x)))
    assert same(before, grads_of(model))
    assert len(monitor.history) == 0


@pytest.mark.parametrize(
    "weights, message", [({"nope": 1.0}, "unknown tasks"), ({"t0": -1.0}, ">= 0"), ({"t0": math.nan}, ">= 0")]
)
def test_bad_weights_raise(setup, weights, message):
    model, x, monitor = setup
    with pytest.raises(ValueError, match=message):
        monitor.backward({t: o.mean() for t, o in model(x).items()}, weights=weights)
    assert all(p.grad is None for p in model.parameters())


def test_loss_without_shared_dependence_is_named(setup):
    model, x, monitor = setup
    out = model(x)
    lonely = model.heads["t2"](torch.zeros(1, 12)).sum()
    with pytest.raises(ValueError, match="'t2' does not depend on any shared parameter"):
        monitor.backward({"t0": out["t0"].mean(), "t1": out["t1"].mean(), "t2": lonely})
    assert all(p.grad is None for p in model.parameters())


def test_no_shared_parameter_is_explained():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    model = nn.ModuleList([a, b])
    with ConflictMonitor(model) as monitor, pytest.raises(ValueError, match="no parameter of the model"):
        monitor.backward({"a": a(torch.ones(1, 2)).sum(), "b": b(torch.ones(1, 2)).sum()})


def test_nonfinite_loss_raises_or_skips(setup):
    model, x, monitor = setup
    out = model(x)
    bad = {"t0": out["t0"].mean() * math.nan, "t1": out["t1"].mean(), "t2": out["t2"].mean()}
    with pytest.raises(FloatingPointError, match=r"\['t0'\]"):
        monitor.backward(bad)
    assert all(p.grad is None for p in model.parameters())
    skipping = ConflictMonitor(model, shared=model.backbone, on_nonfinite="skip")
    report = skipping.backward(bad)
    assert report.skipped and "t0" in report.skip_reason
    assert all(p.grad is None for p in model.parameters())
    assert skipping.history[0].skipped
    with pytest.raises(ValueError, match="skipped"):
        _ = report.cosine
    skipping.close()


def test_propagate_lets_nonfinite_losses_through_like_autograd(setup):
    model, x, _ = setup
    with ConflictMonitor(model, shared=model.backbone, on_nonfinite="propagate") as monitor:
        out = model(x)
        report = monitor.backward({"t0": out["t0"].mean() * math.inf, "t1": out["t1"].mean(), "t2": out["t2"].mean()})
    assert not report.skipped
    assert not torch.isfinite(model.backbone[0].weight.grad).all()


def test_every_k_measures_every_kth_step_and_still_trains_exactly():
    model, x = FAMILIES["mlp"](3)
    twin = copy.deepcopy(model)
    reports = []
    with ConflictMonitor(model, every=3) as monitor:
        for _ in range(6):
            reports.append(monitor.backward(losses_of(model(x))))
            sum(losses_of(twin(x)).values()).backward()
    assert [r is not None for r in reports] == [True, False, False, True, False, False]
    assert [r.step for r in monitor.history] == [0, 3]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_unmeasured_steps_are_not_tapped():
    model, x = FAMILIES["mlp"](3)
    with ConflictMonitor(model, every=2) as monitor:
        monitor.backward(losses_of(model(x)))
        out = model(x)["t0"]  # the next step is not measured: a plain graph
        node, names = out.grad_fn, set()
        stack = [node]
        while stack:
            n = stack.pop()
            names.add(type(n).__name__)
            stack += [c for c, _ in n.next_functions if c is not None]
        assert "_TapBackward" not in names


def test_measure_leaves_grad_and_graph_for_the_user(setup):
    model, x, monitor = setup
    losses = losses_of(model(x))
    report = monitor.measure(losses)
    assert all(p.grad is None for p in model.parameters())
    sum(losses.values()).backward()  # the graph is still alive
    assert all(p.grad is not None for p in model.parameters())
    assert report.step == 0 and len(monitor.history) == 1


def test_close_removes_every_hook():
    model, x = FAMILIES["cnn"](2)
    assert hooks_on(model) == 0
    with ConflictMonitor(model) as monitor:
        assert hooks_on(model) > 0
        monitor.backward(losses_of(model(x)))
    assert hooks_on(model) == 0


def test_reports_serialise_and_history_round_trips(setup, tmp_path):
    model, x, monitor = setup
    for _ in range(3):
        monitor.backward(losses_of(model(x)))
    data = monitor.history[-1].to_dict()
    json.dumps(data, allow_nan=False)
    assert set(data["layers"]) == {"backbone.0", "backbone.2", "backbone.4"}
    path = monitor.history.to_jsonl(tmp_path / "run.jsonl")
    loaded = History.from_jsonl(path)
    assert len(loaded) == 3
    for a, b in zip(loaded, monitor.history):
        assert a.tasks == b.tasks and a.step == b.step
        torch.testing.assert_close(a.gram, b.gram.double())
        assert a.conflict_pairs == b.conflict_pairs
    frame = monitor.history.to_dataframe()
    assert list(frame.index) == [0, 1, 2] and "cosine/t0/t1" in frame.columns
    assert set(monitor.history.ema) == {"conflict_fraction", "cancellation", "worst_cosine", "update_norm"}


def test_unknown_engine_and_bad_options():
    model, _ = FAMILIES["mlp"](2)
    with pytest.raises(ValueError, match="unknown engine"):
        ConflictMonitor(model, engine="fast")
    with pytest.raises(ValueError, match="every"):
        ConflictMonitor(model, every=0)
    with pytest.raises(ValueError, match="shared="):
        ConflictMonitor(model, shared=nn.Linear(2, 2))
