"""The engines against the float64 oracle: T separate autograd.grad calls, on many model families."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradconflict import ConflictMonitor, PerformanceWarning
from tests.zoo import FAMILIES, linear_heads, losses_of, reference

RTOL = 1e-9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


pytestmark = pytest.mark.usefixtures("float64_default")


#: family -> the layers whose parameters no rule covers on the batched pass (their per-task gradients come from
#: autograd): a raw parameter, a weight tied into a second use, attention's projections read outside their forward
AUTOGRAD_LAYERS = {
    "raw_parameter": {"backbone"},
    "tied_weights": {"backbone.emb"},
    "transformer": {"backbone.enc.self_attn", "backbone.enc.self_attn.out_proj"},
}


def expected_routes(family: str, route: str, layers) -> dict[str, str]:
    """The route each layer must report: a rule's (ghost or materialised) or autograd's on the batched pass, the
    per-task loop's (autograd) on the loop, the reference engine's."""
    if route == "batched":
        return {n: "autograd" if n in AUTOGRAD_LAYERS.get(family, ()) else "rule" for n in layers}
    return dict.fromkeys(layers, "reference" if route == "reference" else "autograd")


@pytest.mark.parametrize("route", ["batched", "loop", "reference"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("T", [2, 3, 8])
def test_gram_and_layers_match_oracle(family: str, T: int, route: str):
    """Against the float64 oracle, with the route that ran asserted (a silent fall back from the batched pass to
    the loop would otherwise pass: PerformanceWarning is not an error in the suite)."""
    model, x = FAMILIES[family](T)
    options = {"engine": "reference"} if route == "reference" else {"strategy": route}
    with ConflictMonitor(model, shared=model.backbone, **options) as monitor:
        losses = losses_of(model(x))
        report = monitor.measure(losses)
        ref = reference(model, losses)
    assert report.strategy == route
    for name, want in expected_routes(family, route, report.layers).items():
        got = report.layers[name].route
        assert got in ("ghost", "materialised") if want == "rule" else got == want, (name, got)
    assert report.gram.dtype == torch.float64
    assert rel_err(report.gram, ref.gram) <= RTOL
    assert set(report.layers) == set(ref.layers)
    depth = [name or "(root)" for name, _ in model.named_modules()]  # the order the families were built in
    assert list(report.layers) == sorted(report.layers, key=depth.index)  # bottom to top, whatever the route
    for name, layer in report.layers.items():
        assert rel_err(layer.gram, ref.layers[name]) <= RTOL, name
    assert rel_err(sum(layer.gram for layer in report.layers.values()), report.gram) <= RTOL


@pytest.mark.parametrize(
    "options", [{}, {"strategy": "loop"}, {"engine": "reference"}, {"accumulation_steps": 2}], ids=str
)
def test_a_report_lists_its_layers_bottom_to_top(options):
    # Names that sort against their depth: the backward reaches m_out first, but the report lists the layers in
    # the order the backbone was built (z_in, then a_mid, then m_out), as every reader of a saved run takes them.
    torch.manual_seed(0)
    backbone = nn.Sequential(OrderedDict(
        z_in=nn.Linear(3, 4), act=nn.Tanh(), a_mid=nn.Linear(4, 4), m_out=nn.Linear(4, 2),
    ))
    model = nn.ModuleDict({"backbone": backbone, "heads": nn.ModuleDict(linear_heads(2, 2))})
    x = torch.randn(8, 3)
    with ConflictMonitor(model, **options) as monitor:
        for part in x.split(8 // options.get("accumulation_steps", 1)):
            h = backbone(part)
            report = monitor.backward({t: head(h).pow(2).mean() for t, head in model["heads"].items()})
    assert list(report.layers) == ["backbone.z_in", "backbone.a_mid", "backbone.m_out"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backward_fills_grad_like_autograd(family: str):
    model, x = FAMILIES[family](3)
    twin = copy.deepcopy(model)
    weights = {"t0": 1.0, "t1": 0.25, "t2": 2.0}
    # .grad accumulates, as autograd does: start both from the same non-zero gradient.
    for a, b in zip(model.parameters(), twin.parameters()):
        a.grad = torch.full_like(a, 0.5)
        b.grad = torch.full_like(b, 0.5)
    with ConflictMonitor(model, engine="auto") as monitor:
        monitor.backward(losses_of(model(x)), weights=weights)
    twin_losses = losses_of(twin(x))
    sum(weights[t] * loss for t, loss in twin_losses.items()).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(a.grad, b.grad) <= RTOL, name


def test_discovered_shared_parameters_are_the_backbone():
    model, x = FAMILIES["deep_heads"](3)
    with ConflictMonitor(model) as monitor:
        report = monitor.backward(losses_of(model(x)))
        assert sorted(monitor.shared_parameters) == sorted(
            f"backbone.{n}" for n, _ in model.backbone.named_parameters()
        )
        ref = reference(model, losses_of(model(x)))
    assert rel_err(report.gram, ref.gram) <= RTOL


def test_wide_layers_take_the_ghost_route_and_tied_weights_the_generic_one():
    model, x = FAMILIES["wide_mlp"](3)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        report = monitor.measure(losses_of(model(x)))
    assert report.layers["backbone.0"].route == "ghost"
    model, x = FAMILIES["tied_weights"](3)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        report = monitor.measure(losses_of(model(x)))
    assert report.layers["backbone.emb"].route == "autograd"


def test_float32_model_gives_float32_gram_close_to_float64():
    model, x = FAMILIES["mlp"](4)
    ref = reference(model, losses_of(model(x))).gram
    model32 = copy.deepcopy(model).float()
    with ConflictMonitor(model32, shared=model32.backbone) as monitor:
        report = monitor.measure(losses_of(model32(x.float())))
    assert report.gram.dtype == torch.float32
    assert rel_err(report.gram.double(), ref) <= 1e-5


def test_representation_engine_is_the_gram_at_the_backbone_output_and_labelled_approximate():
    model, x = FAMILIES["mlp"](3)
    twin = copy.deepcopy(model)
    with ConflictMonitor(model, shared=model.backbone, engine="representation") as monitor:
        report = monitor.backward(losses_of(model(x)))
    assert report.approximate and report.engine == "representation"
    z = twin.backbone(x)
    losses = {t: loss for t, loss in losses_of({t: head(z) for t, head in twin.heads.items()}).items()}
    J = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses.values()])
    assert rel_err(report.gram, J @ J.T) <= RTOL
    sum(losses.values()).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert rel_err(a.grad, b.grad) <= RTOL
    with pytest.raises(ValueError, match="shared=<the backbone module>"):
        ConflictMonitor(model, engine="representation")


def test_missing_batching_rule_is_reported_once_not_silently():


    model, x = FAMILIES["transformer"](2)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        with pytest.warns(PerformanceWarning, match="no vmap batching rule.*pass math_attention=True"):
            monitor.backward(losses_of(model(x)))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", PerformanceWarning)
            monitor.backward(losses_of(model(x)))  # reported once per op, not at every step


def test_subclass_with_its_own_forward_and_two_monitors_stay_exact():
    class MaskedLinear(torch.nn.Linear):
        def forward(self, x):  # not Linear's computation: the Linear rule must not be applied
            return torch.nn.functional.linear(x, self.weight.tril(), self.bias)

    model, x = FAMILIES["mlp"](3)
    masked = MaskedLinear(16, 16)
    model.backbone[2] = masked
    with (
        ConflictMonitor(model, shared=model.backbone) as first,
        ConflictMonitor(model, shared=model.backbone, allow_other_monitors=True) as second,
    ):
        losses = losses_of(model(x))
        report = first.measure(losses)
        other = second.measure(losses)
        ref = reference(model, losses)
    for r in (report, other):
        assert rel_err(r.gram, ref.gram) <= RTOL
        assert r.layers["backbone.2"].route == "autograd"


def test_auto_strategy_times_both_candidates_then_keeps_the_faster():
    model, x = FAMILIES["cnn"](3)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        reports = [monitor.measure(losses_of(model(x))) for _ in range(6)]
        ref = reference(model, losses_of(model(x)))
        (choice,) = monitor.plan["choices"]
    assert [r.strategy for r in reports[:4]] == ["batched", "loop", "batched", "loop"]
    assert choice["runs"] == {"batched": 2, "loop": 2}
    fastest = min(choice["seconds"], key=choice["seconds"].get)
    assert choice["strategy"] == fastest and [r.strategy for r in reports[4:]] == [fastest, fastest]
    for r in reports:  # every strategy is exact
        assert rel_err(r.gram, ref.gram) <= RTOL


def test_auto_strategy_judges_each_candidate_by_its_faster_run(monkeypatch):
    """A cold first batched step (10 s here) must not hand the choice to a loop that is slower once warm."""
    from types import SimpleNamespace

    import gradconflict.measure.engine.tapped as tapped

    durations = iter([10.0, 2.0, 1.0, 2.0])  # batched, loop, batched, loop
    clock = {"now": 0.0, "started": False}

    def perf_counter():
        if clock["started"]:
            clock["now"] += next(durations)
        clock["started"] = not clock["started"]
        return clock["now"]

    monkeypatch.setattr(tapped, "time", SimpleNamespace(perf_counter=perf_counter))  # the engine's clock only
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        strategies = [monitor.measure(losses_of(model(x))).strategy for _ in range(5)]
        (choice,) = monitor.plan["choices"]
    assert strategies == ["batched", "loop", "batched", "loop", "batched"]
    assert choice["seconds"] == {"batched": 1.0, "loop": 2.0} and choice["strategy"] == "batched"


def test_the_loop_is_not_a_candidate_beyond_its_memory_budget_and_both_can_be_forced():
    model, x = FAMILIES["mlp"](3)
    with ConflictMonitor(model, shared=model.backbone, loop_memory=0) as monitor:
        assert {monitor.measure(losses_of(model(x))).strategy for _ in range(3)} == {"batched"}
    for strategy in ("batched", "loop"):
        with ConflictMonitor(model, shared=model.backbone, strategy=strategy) as monitor:
            report = monitor.measure(losses_of(model(x)))
            assert report.strategy == strategy and monitor.plan["strategy"] == strategy
            assert rel_err(report.gram, reference(model, losses_of(model(x))).gram) <= RTOL
            if strategy == "loop":  # nothing to tap: the forwards stay plain
                from gradconflict.measure.graph import walk_graph

                assert not walk_graph([model(x)["t0"].sum()]).calls


def test_math_attention_avoids_the_per_task_fallback_and_puts_the_flags_back():
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x = FAMILIES["transformer"](3)
    twin, ref = copy.deepcopy(model), copy.deepcopy(model)
    flags = torch.backends.cuda.flash_sdp_enabled()
    with ConflictMonitor(model, shared=model.backbone, math_attention=True, strategy="batched") as monitor:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PerformanceWarning)  # no per-task loop inside the batched pass
            report = monitor.backward(losses_of(model(x)))
    assert torch.backends.cuda.flash_sdp_enabled() == flags
    with sdpa_kernel(SDPBackend.MATH):  # the plain loop, with the kernel the measured forward used
        sum(losses_of(twin(x)).values()).backward()
        expected = reference(ref, losses_of(ref(x)))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert rel_err(a.grad, b.grad) <= 1e-12
    assert rel_err(report.gram, expected.gram) <= RTOL


def test_a_resumed_run_finishes_the_strategy_trial_where_it_stopped():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model, shared=model.backbone) as first:
        for _ in range(3):  # batched, loop, batched: one trial step left
            first.measure(losses_of(model(x)))
        state, plan = first.state_dict(), first.plan
    with ConflictMonitor(model, shared=model.backbone) as resumed:
        resumed.load_state_dict(state)
        assert resumed.plan == plan
        strategies = [resumed.measure(losses_of(model(x))).strategy for _ in range(2)]
        (choice,) = resumed.plan["choices"]
    assert strategies[0] == "loop" and choice["runs"] == {"batched": 2, "loop": 2}
    assert strategies[1] == choice["strategy"] == min(choice["seconds"], key=choice["seconds"].get)
