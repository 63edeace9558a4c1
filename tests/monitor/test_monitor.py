"""ConflictMonitor's contract: bad input rejected with nothing changed, every=k, measure(), non-finite steps,
lifecycle (close, garbage collection, one monitor per model), serialisation and resuming."""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module

from gradconflict import ConflictMonitor, History, JSONLSink
from tests.zoo import FAMILIES, losses_of


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b)
    )


def global_hooks() -> int:
    return len(nn_module._global_forward_hooks)


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def setup():
    model, x = FAMILIES["mlp"](3)
    monitor = ConflictMonitor(model, shared=model.backbone)
    yield model, x, monitor
    monitor.close()


@pytest.mark.parametrize(
    "make_losses, message",
    [
        (lambda out: {}, "non-empty"),
        (lambda out: {"t0": out["t0"], "t1": out["t1"].mean()}, "shape"),
        (lambda out: {"t0": out["t0"].mean(), "t1": 3.0}, "not a tensor"),
        (lambda out: {"t0": out["t0"].mean(), "t1": out["t1"].detach().mean()}, "does not require grad"),
        (lambda out: {"t0": out["t0"].mean(), "t1": torch.ones((), device="meta", requires_grad=True)}, "devices"),
        (lambda out: {1: out["t0"].mean(), "1": out["t1"].mean()}, "both name the task '1'"),
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
    assert len(monitor.history) == 0 and monitor.step == 0  # a rejected call is not a step


@pytest.mark.parametrize(
    "weights, error, message",
    [
        ({"nope": 1.0}, ValueError, "unknown tasks"),
        ({"t0": -1.0}, ValueError, ">= 0"),
        ({"t0": math.nan}, ValueError, ">= 0"),
        ({"t0": "2"}, TypeError, "weights must be numbers"),
        ({"t0": True}, TypeError, "weights must be numbers"),
        ({"t0": torch.ones(2)}, ValueError, "scalar"),
        ({"t0": torch.tensor(-2.0, requires_grad=True)}, ValueError, ">= 0"),
    ],
)
def test_bad_weights_raise_and_change_nothing(setup, weights, error, message):
    model, x, monitor = setup
    with pytest.raises(error, match=message):
        monitor.backward({t: o.mean() for t, o in model(x).items()}, weights=weights)
    assert all(p.grad is None for p in model.parameters()) and monitor.step == 0


def test_weights_are_matched_by_name_whatever_the_key_type():
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    with ConflictMonitor(model) as monitor:
        out = model(x)
        report = monitor.backward({0: out["t0"].pow(2).mean(), 1: out["t1"].mean()}, weights={0: 1, 1: 3})
    assert report.tasks == ("0", "1") and report.weights.tolist() == [1.0, 3.0]
    out = twin(x)
    (out["t0"].pow(2).mean() + 3 * out["t1"].mean()).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


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


@pytest.mark.parametrize(
    "option", [{"every": 0}, {"every": 1.5}, {"threshold": 2.0}, {"threshold": "0"}, {"on_nonfinite": "ignore"},
               {"accumulation_steps": 0}, {"engine": "fast"}, {"max_history": 0}, {"ema_decay": 1.0}]
)
def test_bad_options_are_refused(option):
    model, _ = FAMILIES["mlp"](2)
    with pytest.raises(ValueError):
        ConflictMonitor(model, **option)
    assert global_hooks() == 0


def test_shared_must_belong_to_the_model():
    model, _ = FAMILIES["mlp"](2)
    with pytest.raises(ValueError, match="shared="):
        ConflictMonitor(model, shared=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shared="):
        ConflictMonitor(model, shared=[nn.Parameter(torch.ones(2))])


def test_nonfinite_loss_raises_or_skips():
    model, x = FAMILIES["mlp"](3)

    def bad():
        out = model(x)
        return {"t0": out["t0"].mean() * math.nan, "t1": out["t1"].mean(), "t2": out["t2"].mean()}

    with ConflictMonitor(model, shared=model.backbone) as monitor:
        with pytest.raises(FloatingPointError, match=r"non-finite loss for task\(s\) \['t0'\]"):
            monitor.backward(bad())
        assert all(p.grad is None for p in model.parameters()) and monitor.step == 0
    with ConflictMonitor(model, shared=model.backbone, on_nonfinite="skip") as skipping:
        report = skipping.backward(bad())
        assert report.skipped and "t0" in report.skip_reason
        assert all(p.grad is None for p in model.parameters())
        assert skipping.history[0].skipped and skipping.step == 1
        with pytest.raises(ValueError, match="skipped"):
            _ = report.cosine


def test_nonfinite_gradient_with_finite_loss_is_never_recorded():
    model, x = FAMILIES["mlp"](2)

    def step():
        out = model(x)
        # sqrt at 0: the loss is finite, its gradient is not
        return {"t0": (out["t0"] * 0).sum().sqrt() + out["t0"].mean(), "t1": out["t1"].mean()}

    with ConflictMonitor(model) as monitor, pytest.raises(FloatingPointError, match="non-finite gradient"):
        monitor.backward(step())
    assert all(p.grad is None for p in model.parameters())
    with ConflictMonitor(model, on_nonfinite="skip") as monitor:
        assert monitor.backward(step()).skipped
        monitor.backward(losses_of(model(x)))
        assert all(math.isfinite(v) for v in monitor.history.ema.values())
    with ConflictMonitor(model, on_nonfinite="propagate") as monitor:
        monitor.backward(step())  # no check, no sync: the NaN reaches .grad as with a plain backward ...
        assert not torch.isfinite(model.backbone[0].weight.grad).all()
        monitor.backward(losses_of(model(x)))
        assert monitor.history[0].skipped  # ... but never the history or its averages
        assert all(math.isfinite(v) for v in monitor.history.ema.values())
        monitor.advise()


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
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_a_rejected_call_does_not_shift_the_every_phase():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model, every=2) as monitor:
        with pytest.raises(ValueError):
            monitor.backward({})
        assert monitor.backward(losses_of(model(x))) is not None
        assert monitor.backward(losses_of(model(x))) is None


def test_unmeasured_steps_are_not_tapped():
    model, x = FAMILIES["mlp"](3)
    with ConflictMonitor(model, every=2) as monitor:
        monitor.backward(losses_of(model(x)))
        assert global_hooks() == 0  # the next step is not measured: no hook at all
        out = model(x)["t0"]
        assert not walk_calls(out)


def walk_calls(t: torch.Tensor) -> list:
    from gradconflict.measure.graph import walk_graph

    return walk_graph([t]).calls


def test_measure_leaves_grad_and_graph_for_the_user(setup):
    model, x, monitor = setup
    losses = losses_of(model(x))
    report = monitor.measure(losses)
    assert all(p.grad is None for p in model.parameters())
    sum(losses.values()).backward()  # the graph is still alive
    assert all(p.grad is not None for p in model.parameters())
    assert report.step == 0 and len(monitor.history) == 1


def test_close_removes_the_hook_and_a_closed_monitor_refuses_to_measure():
    model, x = FAMILIES["cnn"](2)
    with ConflictMonitor(model) as monitor:
        assert global_hooks() == 1 and hooks_on(model) == 0  # nothing is stored on the model
        monitor.backward(losses_of(model(x)))
    assert global_hooks() == 0 and monitor.closed
    with pytest.raises(RuntimeError, match="closed"):
        monitor.backward(losses_of(model(x)))
    assert len(monitor.history) == 1  # the history stays readable


def test_a_dropped_monitor_removes_its_hook():
    model, x = FAMILIES["mlp"](2)
    for _ in range(3):
        monitor = ConflictMonitor(model)
        monitor.backward(losses_of(model(x)))
        del monitor
        gc.collect()
    assert global_hooks() == 0
    ConflictMonitor(model).close()  # and the model is free for a new one


def test_one_monitor_per_model_unless_allowed():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model) as first:
        with pytest.raises(ValueError, match="another ConflictMonitor"):
            ConflictMonitor(model.backbone)
        with ConflictMonitor(model, allow_other_monitors=True) as second:
            losses = losses_of(model(x))
            a = second.measure(losses)
            b = first.backward(losses)
            torch.testing.assert_close(a.gram, b.gram)
            with pytest.raises(RuntimeError, match="already freed"):
                second.backward(losses)


class Picklable(nn.Module):
    """Defined at module level, so that pickle can find it."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.LayerNorm(24))
        self.heads = nn.ModuleDict({"t0": nn.Linear(24, 1), "t1": nn.Linear(24, 1)})

    def forward(self, x):
        h = self.backbone(x)
        return {t: head(h) for t, head in self.heads.items()}


def test_model_with_a_monitor_can_be_saved_copied_and_pickled():
    model, x = Picklable(), torch.randn(3, 2, 8)
    with ConflictMonitor(model) as monitor:
        monitor.backward(losses_of(model(x)))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        clone = copy.deepcopy(model)
        pickled = pickle.loads(pickle.dumps(model))
    assert hooks_on(clone) == hooks_on(pickled) == 0
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (clone, pickled, loaded):
        assert not walk_calls(m(x)["t0"])  # a copy carries no tap
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


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
    assert set(monitor.history.ema) == {
        "conflict_fraction", "cancellation", "worst_cosine", "update_norm", "cosine/t0/t1", "cosine/t0/t2",
        "cosine/t1/t2",
    }


def test_state_dict_resumes_step_history_averages_and_shared_set(tmp_path):
    model, x = FAMILIES["deep_heads"](3)
    with ConflictMonitor(model, every=2) as monitor:
        for _ in range(5):
            monitor.backward(losses_of(model(x)))
        torch.save(monitor.state_dict(), tmp_path / "monitor.pt")
        before = (monitor.step, monitor.shared_parameters, monitor.history.ema, [r.to_dict() for r in monitor.history])
    with ConflictMonitor(model, every=2) as resumed:
        resumed.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=False))
        after = (resumed.step, resumed.shared_parameters, resumed.history.ema, [r.to_dict() for r in resumed.history])
        assert after == before
        assert resumed.backward(losses_of(model(x))) is None  # step 5: the every=2 phase carries on
        assert resumed.backward(losses_of(model(x))).step == 6


def test_streaming_sink_writes_each_step_as_it_happens(tmp_path):
    model, x = FAMILIES["mlp"](2)
    path = tmp_path / "run.jsonl"
    monitor = ConflictMonitor(model, sinks=[JSONLSink(path)])
    for k in range(3):
        monitor.backward(losses_of(model(x)))
        assert len(path.read_text().splitlines()) == k + 1  # on disk before the run goes on
    lines = path.read_text().splitlines()
    assert [json.loads(line)["schema"] for line in lines] == [2, 2, 2]
    with path.open("a") as f:
        f.write(lines[-1][:25])  # a crash while writing: the last line is cut short
    with pytest.warns(RuntimeWarning, match="line 4 is not JSON"):
        assert len(History.from_jsonl(path)) == 3
    monitor.close()


def test_arming_and_closing_leave_no_trace_in_torch_registries():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model, every=2) as monitor:
        for _ in range(6):
            monitor.backward(losses_of(model(x)))
    assert not nn_module._has_any_global_hook()


def test_an_error_inside_the_measurement_never_stops_training(monkeypatch):
    from gradconflict import MeasurementWarning

    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    with ConflictMonitor(model) as monitor:

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in a layer rule")

        monkeypatch.setattr(monitor.engine, "measure", broken)
        with pytest.warns(MeasurementWarning, match="a bug in a layer rule"):
            report = monitor.backward(losses_of(model(x)))
    assert report.skipped and "measurement failed" in report.skip_reason
    sum(losses_of(twin(x)).values()).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)  # trained as usual


def test_a_frozen_backbone_is_stated_not_an_error():
    model, x = FAMILIES["mlp"](2)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        report = monitor.backward(losses_of(model(x)))
    assert report.skipped and "no shared parameter requires grad" in report.skip_reason
    assert all(p.grad is not None for p in model.heads.parameters())


def test_a_state_for_another_model_is_refused():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model) as monitor:
        monitor.backward(losses_of(model(x)))
        state = monitor.state_dict()
    other, _ = FAMILIES["deep_heads"](2)
    with ConflictMonitor(other) as monitor:
        with pytest.raises(ValueError, match="are not parameters of this model"):
            monitor.load_state_dict(state)
        with pytest.raises(ValueError, match="not a ConflictMonitor state"):
            monitor.load_state_dict({"schema": 0})


def test_representation_engine_needs_an_output_and_no_micro_batches():
    model, x = FAMILIES["mlp"](2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        ConflictMonitor(model, shared=model.backbone, engine="representation", accumulation_steps=2)
    with ConflictMonitor(model, shared=model.backbone, engine="representation") as monitor:
        w = model.backbone[0].weight
        losses = {t: head(torch.ones(1, 12)).sum() + 0 * w.sum() for t, head in model.heads.items()}
        with pytest.raises(ValueError, match="found no output of the shared module"):
            monitor.backward(losses)


def test_a_weighting_needs_the_monitors_own_backward():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model) as monitor, pytest.raises(ValueError, match="backward_fn"):
        monitor.backward(losses_of(model(x)), weighting="mgda", backward_fn=lambda: None)
    assert all(p.grad is None for p in model.parameters())
