"""``monitor.backward(losses, weighting=...)``: what the method sees, what ``.grad`` and the report hold, what
unmeasured, skipped and resumed steps do; the reference is T separate ``autograd.grad`` calls in float64."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from gradconflict import ConflictMonitor
from gradconflict.weighting import PCGrad, WeightingError, WeightingWarning
from tests.zoo import FAMILIES, losses_of

TASKS = ["t0", "t1", "t2"]


def _model():
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    return model.double(), x.double()


def _per_task(model, x):
    """Each task's gradient of every parameter (float64), and the Gram over the backbone."""
    losses = losses_of(model(x))
    params = list(model.parameters())
    grads = {
        t: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        for t, loss in losses.items()
    }
    n = len(list(model.backbone.parameters()))
    J = torch.stack([torch.cat([g.flatten() for g in grads[t][:n]]) for t in TASKS])
    return grads, J @ J.T, n


def _expected_grads(model, x, scales, weights):
    grads, _, n = _per_task(model, x)
    return [
        sum((scales[t] if k < n else 1.0) * weights[t] * grads[t][k] for t in TASKS)
        for k in range(len(list(model.parameters())))
    ]


def _assert_grads(model, expected):
    for (name, p), want in zip(model.named_parameters(), expected):
        assert torch.allclose(p.grad, want, rtol=1e-10, atol=1e-14), name


def test_the_method_sees_the_weighted_tasks_and_the_report_holds_the_weights_used():
    model, x = _model()
    weights = {"t0": 1.0, "t1": 0.5, "t2": 2.0}
    fixed = {"t0": 0.3, "t1": 1.0, "t2": 0.2}
    seen = {}

    def rule(gram, losses):
        seen.update(gram=gram, losses=losses)
        return fixed

    _, G, _ = _per_task(model, x)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        losses = {t: loss.detach() for t, loss in losses_of(model(x)).items()}
        report = monitor.backward(losses_of(model(x)), weights, weighting=rule)
        assert monitor.history[-1].weights.tolist() == pytest.approx([0.3, 0.5, 0.4])
    w = torch.tensor([weights[t] for t in TASKS], dtype=torch.float64)
    assert torch.allclose(seen["gram"], G * w[:, None] * w[None, :], rtol=1e-10)
    assert seen["losses"] == pytest.approx({t: weights[t] * losses[t].item() for t in TASKS})
    assert report.weights.tolist() == pytest.approx([0.3, 0.5, 0.4])  # lambda_i w_i
    _assert_grads(model, _expected_grads(model, x, fixed, weights))


def test_a_task_with_weight_zero_takes_no_part():
    model, x = _model()
    seen = []
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        report = monitor.backward(
            losses_of(model(x)), {"t1": 0.0}, weighting=lambda gram, losses: seen.append(list(losses)) or [1.0, 1.0]
        )
    assert seen == [["t0", "t2"]]
    assert report.weights.tolist() == [1.0, 0.0, 1.0]
    _assert_grads(model, _expected_grads(model, x, {"t0": 1.0, "t1": 0.0, "t2": 1.0}, {"t0": 1, "t1": 0, "t2": 1}))


def test_unmeasured_steps_reuse_the_last_weights():
    model, x = _model()
    x2 = torch.randn_like(x)
    with ConflictMonitor(model, shared=model.backbone, every=2) as monitor:
        report = monitor.backward(losses_of(model(x)), weighting="mgda")
        scales = dict(zip(TASKS, report.weights.tolist()))
        model.zero_grad()
        assert monitor.backward(losses_of(model(x2)), weighting="mgda") is None
    _assert_grads(model, _expected_grads(model, x2, scales, dict.fromkeys(TASKS, 1.0)))
    assert sum(scales.values()) == pytest.approx(1.0) and len(set(scales.values())) == 3


def test_an_unmeasured_step_with_other_tasks_trains_the_plain_sum_and_says_so():
    model, x = _model()
    with ConflictMonitor(model, shared=model.backbone, every=2) as monitor:
        monitor.backward(losses_of(model(x)), weighting="mgda")
        model.zero_grad()
        losses = losses_of(model(x))
        del losses["t2"]
        with pytest.warns(WeightingWarning, match="differ from the last measured step's.*plain weighted sum"):
            monitor.backward(losses, weighting="mgda")
    grads, _, _ = _per_task(model, x)
    for k, p in enumerate(model.parameters()):
        got = torch.zeros_like(p) if p.grad is None else p.grad  # head t2: not in this step
        assert torch.allclose(got, grads["t0"][k] + grads["t1"][k], rtol=1e-10, atol=1e-14)


def test_measure_reports_the_weights_and_leaves_grad_alone():
    model, x = _model()
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        report = monitor.measure(losses_of(model(x)), weighting="mgda")
    assert all(p.grad is None for p in model.parameters())
    assert report.weights.sum().item() == pytest.approx(1.0)


def test_the_same_spec_keeps_its_state_and_a_resumed_monitor_continues_it():
    model, x = _model()
    batches = [torch.randn_like(x) for _ in range(4)]
    straight = copy.deepcopy(model)
    with ConflictMonitor(straight, shared=straight.backbone) as monitor:
        expected = [monitor.backward(losses_of(straight(b)), weighting="pcgrad").weights for b in batches]
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    with ConflictMonitor(first, shared=first.backbone) as monitor:
        for b in batches[:2]:
            monitor.backward(losses_of(first(b)), weighting="pcgrad")
        buffer = io.BytesIO()
        torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    with ConflictMonitor(second, shared=second.backbone) as monitor:
        monitor.load_state_dict(torch.load(buffer, weights_only=False))
        resumed = [monitor.backward(losses_of(second(b)), weighting="pcgrad").weights for b in batches[2:]]
    assert all(torch.equal(a, b) for a, b in zip(resumed, expected[2:]))


def test_a_new_object_each_step_starts_afresh_the_same_object_does_not():
    model, x = _model()
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        rule = PCGrad(seed=0)
        monitor.backward(losses_of(model(x)), weighting=rule)
        monitor.backward(losses_of(model(x)), weighting=rule)
        assert monitor.state_dict()["weighting"]["state"]["generator"].equal(rule.state_dict()["generator"])


def test_a_failing_method_keeps_the_last_weights_and_warns():
    model, x = _model()
    calls = []

    def flaky(gram, losses):
        calls.append(1)
        if len(calls) == 2:
            raise WeightingError("solver failed")
        return [0.5, 0.25, 1.0]

    with ConflictMonitor(model, shared=model.backbone) as monitor:
        monitor.backward(losses_of(model(x)), weighting=flaky)
        model.zero_grad()
        with pytest.warns(WeightingWarning, match="solver failed; this step keeps the last weights"):
            report = monitor.backward(losses_of(model(x)), weighting=flaky)
    assert report.weights.tolist() == [0.5, 0.25, 1.0]
    _assert_grads(model, _expected_grads(model, x, dict(zip(TASKS, [0.5, 0.25, 1.0])), dict.fromkeys(TASKS, 1.0)))


def test_bad_method_output_is_an_error_naming_it():
    model, x = _model()
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        with pytest.raises(ValueError, match="weighting 'two' returned weights of shape \\(2,\\) for 3 tasks"):

            def two(gram, losses):
                return [1.0, 1.0]

            monitor.backward(losses_of(model(x)), weighting=two)


def test_weighting_with_accumulation_is_refused():
    model, x = _model()
    with ConflictMonitor(model, accumulation_steps=2) as monitor:
        with pytest.raises(ValueError, match="accumulation_steps > 1"):
            monitor.backward(losses_of(model(x)), weighting="mgda")


def test_parameters_weighted_without_being_measured_are_named():
    model, x = _model()
    first = model.backbone[0]
    with ConflictMonitor(model, shared=first) as monitor:
        with pytest.warns(WeightingWarning, match="'backbone.2.weight'.*not the measured shared parameters"):
            monitor.backward(losses_of(model(x)), weighting="mgda")


def test_a_step_without_weights_yet_trains_the_plain_sum():
    """The first step carries one task: the shared parameters are not known yet, nothing is measured."""
    model, x = _model()
    with ConflictMonitor(model) as monitor:
        losses = losses_of(model(x))
        with pytest.warns(WeightingWarning, match="no step has given mgda weights"):
            report = monitor.backward({"t0": losses["t0"]}, weighting="mgda")
    assert report.skipped
    grads, _, _ = _per_task(model, x)
    for k, p in enumerate(model.parameters()):
        got = torch.zeros_like(p) if p.grad is None else p.grad  # heads t1, t2: not in this step
        assert torch.allclose(got, grads["t0"][k], rtol=1e-10, atol=1e-14)


def test_grad_scaler_scales_the_weighted_update():
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = {"t0": 0.5, "t1": 0.0, "t2": 1.5}
    with ConflictMonitor(model, scaler=scaler) as monitor:
        monitor.backward(losses_of(model(x)), weighting=lambda gram, losses: rule)
        scaler.unscale_(optimizer)
    with ConflictMonitor(twin) as monitor:
        monitor.backward(losses_of(twin(x)), weighting=lambda gram, losses: rule)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_no_weighting_changes_nothing():
    model, x = _model()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeightingWarning)
        with ConflictMonitor(model) as monitor:
            monitor.backward(losses_of(model(x)), weighting="mgda")
            model.zero_grad()
            report = monitor.backward(losses_of(model(x)))  # back to the plain sum
    sum(losses_of(twin(x)).values()).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert report.weights.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore::gradconflict.measure.engine.PerformanceWarning")
@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")
def test_a_compiled_model_gets_the_weighted_update_and_is_told_about_its_heads():
    """Inside a compiled region autograd cannot tell the heads apart: they get the combination too, and the
    warning says so. The shared parameters get sum_i lambda_i g_i."""
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin = copy.deepcopy(model)
    rule = {"t0": 0.5, "t1": 0.0, "t2": 1.5}
    compiled = torch.compile(model)
    with ConflictMonitor(compiled) as monitor:
        with pytest.warns(WeightingWarning, match="heads.t.*compiled region"):
            monitor.backward(losses_of(compiled(x)), weighting=lambda gram, losses: rule)
    losses = losses_of(twin(x))
    backbone = list(twin.backbone.parameters())
    grads = {t: torch.autograd.grad(losses[t], backbone, retain_graph=True) for t in TASKS}
    for k, p in enumerate(model.backbone.parameters()):
        assert torch.allclose(p.grad, sum(rule[t] * grads[t][k] for t in TASKS), rtol=1e-5, atol=1e-7)
