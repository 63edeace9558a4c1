"""The monitor under failure and misuse: each case against a plain loop (``.grad`` of ``(sum_i w_i L_i).backward()``
on a copy of the model) or an independent float64 oracle (T separate ``torch.autograd.grad`` calls)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gradconflict import ConflictMonitor, DetachedTaskWarning, MeasurementWarning, is_measuring
from tests.zoo import FAMILIES, losses_of


def oracle_gram(losses: dict[str, torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """``J @ J.T`` of the tasks' gradients on ``params``, from T separate ``autograd.grad`` calls."""
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)])
        for loss in losses.values()
    ]
    J = torch.stack(rows).double()
    return J @ J.T


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_same_grads(model: nn.Module, twin: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name


def plain_step(twin: nn.Module, x: torch.Tensor) -> None:
    sum(losses_of(twin(x)).values()).backward()


# ------------------------------------------------------------------------------------------ the generic fallback
def _raise(*args, **kwargs):
    raise RuntimeError("injected")


def _after(original):
    """The original call, then a failure: the engine's own backward has run when it raises."""

    def run(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyError("injected after the engine's backward")

    return run


INJECTIONS = {
    "plan": lambda m: ("_measuring.planner.plan_for", _raise),
    "engine, before its backward": lambda m: ("engine.measure", _raise),
    "engine, after its backward": lambda m: ("engine.measure", _after(m.engine.measure)),
    "unscaling": lambda m: ("_scaling.unscale_measurement", _raise),
    "report": lambda m: ("_measuring.assembler.measured", _raise),
}


def _patch(monkeypatch, monitor, where: str, replacement) -> None:
    owner_path, attr = where.rsplit(".", 1)
    owner = monitor
    for part in owner_path.split("."):
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, attr, replacement)


@pytest.mark.parametrize("point", sorted(INJECTIONS))
def test_a_failure_anywhere_in_the_measuring_pass_trains_the_plain_step_and_warns_once(monkeypatch, point):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin = copy.deepcopy(model)
    with ConflictMonitor(model) as monitor:
        _patch(monkeypatch, monitor, *INJECTIONS[point](monitor))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports = []
            for _ in range(3):
                for p in model.parameters():
                    p.grad = None
                reports.append(monitor.backward(losses_of(model(x))))
        assert [w.category for w in caught] == [MeasurementWarning]  # once, not once per step
        assert all(r.skipped and r.skip_reason.startswith("measurement failed") for r in reports)
        assert monitor.step == 3 and len(monitor.history) == 3
    plain_step(twin, x)
    assert_same_grads(model, twin)


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_a_hook_that_raises_inside_the_measuring_backward_trains_the_plain_step(engine):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)

    def refuse_measurement(grad):
        if is_measuring():
            raise RuntimeError("this hook cannot run batched")
        return grad

    with ConflictMonitor(model, engine=engine) as monitor, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = model.backbone(x)
        h.register_hook(refuse_measurement)
        report = monitor.backward({t: head(h).pow(2).mean() for t, head in model.heads.items()})
    assert MeasurementWarning in [w.category for w in caught]
    assert report.skipped and report.skip_reason.startswith("measurement failed")
    h = twin.backbone(x)
    sum(head(h).pow(2).mean() for head in twin.heads.values()).backward()
    assert_same_grads(model, twin)


def test_a_failure_while_accumulating_micro_batches_trains_every_micro_batch(monkeypatch):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    with ConflictMonitor(model, accumulation_steps=2) as monitor:
        monkeypatch.setattr(monitor.engine, "gradients", _after(monitor.engine.gradients))
        with pytest.warns(MeasurementWarning):
            assert monitor.backward(losses_of(model(x[:10]))) is None
            report = monitor.backward(losses_of(model(x[10:])))
    assert report.skipped and report.skip_reason.startswith("measurement failed")
    plain_step(twin, x[:10])
    plain_step(twin, x[10:])
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_a_measurement_that_works_again_is_measured_against_the_oracle(monkeypatch):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        with monkeypatch.context() as patch:
            patch.setattr(monitor.engine, "measure", _raise)
            with pytest.warns(MeasurementWarning):
                assert monitor.backward(losses_of(model(x))).skipped
        losses = losses_of(model(x))
        expected = oracle_gram(losses, list(model.backbone.parameters()))
        report = monitor.measure(losses)
    torch.testing.assert_close(report.gram.double(), expected, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------ GradScaler at any scale
@pytest.mark.parametrize("exponent", [16, 64, 65, 100])
def test_grad_scaler_gram_at_large_scales_matches_the_float64_oracle(exponent):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    ref = copy.deepcopy(model).double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**exponent)
    with ConflictMonitor(model, scaler=scaler, shared=model.backbone) as monitor:
        report = monitor.backward(losses_of(model(x)))
    assert not report.skipped  # every gradient is finite: never an overflow
    expected = oracle_gram(losses_of(ref(x.double())), list(ref.backbone.parameters()))
    assert report.gram.dtype == torch.float32
    torch.testing.assert_close(report.gram.double(), expected, rtol=1e-5, atol=0)
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**exponent)
    twin_scaler.scale(sum(losses_of(twin(x)).values())).backward()
    assert_same_grads(model, twin)  # .grad written scaled, as the plain loop's


def test_grad_scaler_calls_an_overflow_so_exactly_when_the_scaled_gradients_overflow():
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with ConflictMonitor(model, scaler=scaler, shared=model.backbone) as monitor:
        report = monitor.backward({k: v * 1e3 for k, v in losses_of(model(x)).items()})
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    twin_scaler.scale(sum(v * 1e3 for v in losses_of(twin(x)).values())).backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in twin.parameters())
    assert not finite  # the case is a real overflow ...
    assert report.skipped and report.skip_reason.startswith("gradient overflow")  # ... and reported as one
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


def test_grad_scaler_micro_batches_at_a_large_scale_match_the_oracle():
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    ref = copy.deepcopy(model).double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**80)
    with ConflictMonitor(model, scaler=scaler, shared=model.backbone, accumulation_steps=2) as monitor:
        monitor.backward(losses_of(model(x[:10])))
        report = monitor.backward(losses_of(model(x[10:])))
    assert not report.skipped
    params = list(ref.backbone.parameters())
    halves = [losses_of(ref(part.double())) for part in (x[:10], x[10:])]
    summed = {t: halves[0][t] + halves[1][t] for t in halves[0]}
    torch.testing.assert_close(report.gram.double(), oracle_gram(summed, params), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ weights= forms
@pytest.mark.parametrize(
    "make", [list, tuple, torch.tensor, lambda w: torch.tensor(w, requires_grad=True)], ids=["list", "tuple", "tensor",
                                                                                             "learned"]
)
def test_weights_as_a_sequence_are_read_in_the_order_of_the_losses(make):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin = copy.deepcopy(model)
    values = [0.5, 2.0, 1.25]
    weights = make(values)
    with ConflictMonitor(model) as monitor:
        report = monitor.backward(losses_of(model(x)), weights=weights)
    assert report.weights.tolist() == values
    twin_weights = torch.tensor(values, requires_grad=True)
    losses = losses_of(twin(x))
    sum(w * loss for w, loss in zip(twin_weights.unbind(), losses.values())).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    if isinstance(weights, torch.Tensor) and weights.requires_grad:
        torch.testing.assert_close(weights.grad, twin_weights.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "weights, error",
    [([1.0, 2.0], ValueError), (torch.ones(3, 1), ValueError), ({1.0, 2.0, 3.0}, TypeError), ("abc", TypeError)],
)
def test_weights_in_a_form_that_cannot_be_matched_to_the_tasks_raise_and_change_nothing(weights, error):
    model, x = FAMILIES["mlp"](3)
    with ConflictMonitor(model) as monitor:
        with pytest.raises(error):
            monitor.backward(losses_of(model(x)), weights=weights)
        assert monitor.step == 0 and len(monitor.history) == 0
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------ frozen, detached, new
def test_a_frozen_backbone_with_discovery_trains_as_usual_then_is_measured_once_unfrozen():
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    for m in (model, twin):
        m.backbone.requires_grad_(False)
    with ConflictMonitor(model) as monitor:  # shared=None: discovered
        report = monitor.backward(losses_of(model(x)))
        assert report.skipped
        plain_step(twin, x)
        assert_same_grads(model, twin)
        model.backbone.requires_grad_(True)
        losses = losses_of(model(x))
        expected = oracle_gram(losses, list(model.backbone.parameters()))
        report = monitor.measure(losses)
    assert not report.skipped
    torch.testing.assert_close(report.gram.double(), expected, rtol=1e-5, atol=1e-9)


def test_a_loss_detached_from_the_backbone_later_warns_once_and_training_is_unchanged():
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)

    def losses(m, detach):
        h = m.backbone(x)
        return {"t0": m.heads["t0"](h).pow(2).mean(), "t1": m.heads["t1"](h.detach() if detach else h).pow(2).mean()}

    with ConflictMonitor(model) as monitor, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            report = monitor.backward(losses(model, detach=step > 0))
            sum(losses(twin, detach=step > 0).values()).backward()
    assert [w.category for w in caught] == [DetachedTaskWarning]
    assert report.gram[1, 1].item() == 0.0
    assert_same_grads(model, twin)


def test_a_task_with_an_exactly_zero_gradient_that_still_reaches_the_backbone_is_not_warned():
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model) as monitor, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.backward(losses_of(model(x)))
        out = model(x)
        report = monitor.backward({"t0": out["t0"].pow(2).mean(), "t1": out["t1"].mean() * 0.0})
    assert report.gram[1, 1].item() == 0.0
    assert not [w for w in caught if w.category is DetachedTaskWarning]


class _Adapter(nn.Module):
    """A low-rank adapter added next to a backbone layer mid-run (what the split toolkit's LoRA does)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.base = layer
        self.down = nn.Linear(layer.in_features, 2, bias=False)
        self.up = nn.Linear(2, layer.out_features, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("given", [False, True], ids=["discovered", "module"])
def test_parameters_added_mid_run_are_measured_against_the_oracle(given):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model, shared=model.backbone if given else None) as monitor:
        monitor.backward(losses_of(model(x)))
        model.backbone[2] = _Adapter(model.backbone[2])
        model.backbone[2].base.requires_grad_(False)
        twin = copy.deepcopy(model)
        for p in model.parameters():
            p.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeasurementWarning)
            report = monitor.backward(losses_of(model(x)))
        assert not report.skipped
        trainable = [p for p in model.backbone.parameters() if p.requires_grad]
        expected = oracle_gram(losses_of(model(x)), trainable)
        assert "backbone.2.down.weight" in monitor.shared_parameters
    torch.testing.assert_close(report.gram.double(), expected, rtol=1e-5, atol=1e-9)
    assert "backbone.2.up" in report.layers and "backbone.2.base" not in report.layers
    plain_step(twin, x)
    assert_same_grads(model, twin)


@pytest.mark.parametrize("given", [False, True], ids=["discovered", "module"])
def test_parameters_removed_mid_run_leave_the_shared_set(given):
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    model.backbone[2] = _Adapter(model.backbone[2])
    with ConflictMonitor(model, shared=model.backbone if given else None) as monitor:
        monitor.backward(losses_of(model(x)))
        assert "backbone.2.down.weight" in monitor.shared_parameters
        model.backbone[2] = model.backbone[2].base  # the adapter merged away
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeasurementWarning)
            losses = losses_of(model(x))
            expected = oracle_gram(losses, list(model.backbone.parameters()))
            report = monitor.backward(losses)
        assert not [n for n in monitor.shared_parameters if ".down." in n or ".up." in n]
    torch.testing.assert_close(report.gram.double(), expected, rtol=1e-5, atol=1e-9)
    assert "backbone.2" in report.layers and "backbone.2.up" not in report.layers
