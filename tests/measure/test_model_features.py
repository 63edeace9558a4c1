"""Model features that reach into the measuring pass: reparametrised weights, retained activations, sparse
embeddings, parameters substituted by ``torch.func.functional_call``, user forward hooks of every kind, and the
buffers a measurement may touch. Each case compares a monitored run with a plain loop on a copy of the model
(losses, ``.grad``, buffers) and the Gram with the float64 oracle (T separate ``autograd.grad`` calls), and asserts
the route the engine took."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.checkpoint import checkpoint

from gradconflict import ConflictMonitor
from gradconflict.measure.checkpoint import BufferGuard
from tests.measure.test_memory import peak_bytes
from tests.zoo import backward_reference

pytestmark = pytest.mark.usefixtures("float64_default")

RTOL = 1e-12
GRAM_RTOL = 1e-9

#: (engine, strategy): every way the monitor measures with the parameters' gradients
ENGINES = [("auto", "batched"), ("auto", "loop"), ("reference", None)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to_dense(), b.detach().to_dense()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def monitor_for(model: nn.Module, engine: str, strategy: str | None, **kwargs) -> ConflictMonitor:
    options = {"strategy": strategy} if strategy else {}
    return ConflictMonitor(model, engine=engine, **options, **kwargs)


def oracle_gram(losses: dict[str, torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor:
    rows = [
        torch.cat([g.to_dense().flatten() for g in torch.autograd.grad(
            loss, shared, retain_graph=True, allow_unused=True, materialize_grads=True)])
        for loss in losses.values()
    ]
    J = torch.stack(rows)
    return J @ J.T


def expected_route(engine: str, strategy: str | None) -> str:
    return {"auto": strategy, "reference": "reference"}[engine]


class Net(nn.Module):
    def __init__(self, first: nn.Module | None = None):
        super().__init__()
        self.backbone = nn.Sequential(first or nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in ("a", "b", "c")})

    def losses(self, h: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: ((head(h) - (k + 1) * y) ** 2).mean() * (k + 1) for k, (t, head) in enumerate(self.heads.items())}

    def forward(self, x, y):
        return self.losses(self.backbone(x), y)


# ------------------------------------------------------------------------------------------------ reparametrised
PARAMETRISATIONS = {
    "spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m),
    "weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m),
    "orthogonal": lambda m: nn.utils.parametrizations.orthogonal(m),
    "spectral_norm_hook": lambda m: nn.utils.spectral_norm(m),  # the older, forward-pre-hook implementation
}


class CheckpointedNet(Net):
    """The reparametrised layer inside a reentrant checkpoint: the measurement recomputes it."""

    def forward(self, x, y):
        h = checkpoint(self.backbone[0], x.requires_grad_(), use_reentrant=True)  # (reentrant: an input needs grad)
        return self.losses(self.backbone[3](self.backbone[2](self.backbone[1](h))), y)


@pytest.mark.parametrize(
    ("kind", "checkpointed"),
    # the older spectral_norm leaves a computed weight on the module, which deepcopy (the checkpointed oracle's
    # copies) refuses
    [(kind, False) for kind in sorted(PARAMETRISATIONS)]
    + [(kind, True) for kind in sorted(PARAMETRISATIONS) if kind != "spectral_norm_hook"],
)
@pytest.mark.parametrize(("engine", "strategy"), ENGINES)
def test_reparametrised_weights_train_exactly_like_a_plain_loop(kind, engine, strategy, checkpointed):
    """Four SGD steps: the measured steps run each parametrisation as often as a plain step (spectral norm's power
    iteration moves its u/v buffers at every forward), so losses, .grad and buffers stay the plain loop's."""
    torch.manual_seed(0)
    cls = CheckpointedNet if checkpointed else Net
    model = cls(PARAMETRISATIONS[kind](nn.Linear(5, 8)))
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin))
    with monitor_for(model, engine, strategy, shared=model.backbone) as monitor:
        for _ in range(4):
            x, y = torch.randn(12, 5), torch.randn(12, 1)
            if checkpointed:  # autograd.grad refuses reentrant checkpoints: T plain backward passes on copies
                expected_gram = backward_reference(
                    twin, lambda m, x=x, y=y: m(x.clone(), y), lambda m: m.backbone.parameters()
                )
            losses = model(x.clone(), y)
            report = monitor.backward(losses)
            twin_losses = twin(x.clone(), y)
            if not checkpointed:
                expected_gram = oracle_gram(twin_losses, list(twin.backbone.parameters()))
            sum(twin_losses.values()).backward()
            for t in losses:
                assert rel_err(losses[t], twin_losses[t]) <= RTOL
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                assert rel_err(p.grad, q.grad) <= RTOL, name
            assert rel_err(report.gram, expected_gram) <= GRAM_RTOL
            assert report.strategy == expected_route(engine, strategy)
            for m in (opt, twin_opt):
                m.step()
                m.zero_grad()
            for (name, b), c in zip(model.named_buffers(), twin.buffers()):
                assert torch.equal(b, c), name


# ------------------------------------------------------------------------------------------------ retained grads
@pytest.mark.parametrize(("engine", "strategy"), [*ENGINES, ("representation", None)])
def test_retained_activation_gradients_are_the_plain_loops(engine, strategy):
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    x, y = torch.randn(10, 5), torch.randn(10, 1)

    def run(m):
        h = m.backbone(x)
        h.retain_grad()
        outputs = {t: head(h) for t, head in m.heads.items()}
        outputs["a"].retain_grad()
        return h, outputs["a"], {t: ((o - y) ** 2).mean() * (k + 1) for k, (t, o) in enumerate(outputs.items())}

    shared = model.backbone if engine == "representation" else None
    with monitor_for(model, engine, strategy, shared=shared) as monitor:
        for step in range(2):
            h, out, losses = run(model)
            report = monitor.backward(losses, weights={"a": 1.0, "b": 0.5, "c": 2.0})
            twin_h, twin_out, twin_losses = run(twin)
            sum(w * twin_losses[t] for t, w in zip("abc", (1.0, 0.5, 2.0))).backward()
            assert not report.skipped
            assert rel_err(h.grad, twin_h.grad) <= RTOL and rel_err(out.grad, twin_out.grad) <= RTOL
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                assert rel_err(p.grad, q.grad) <= RTOL, (step, name)
    if engine != "representation":
        assert report.strategy == expected_route(engine, strategy)


# ------------------------------------------------------------------------------------------------ sparse
class SparseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 6, sparse=True)
        self.lin = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in "abc"})

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids))).mean(1)
        heads = enumerate(self.heads.items())
        return {t: (head(h) ** 2).mean() * (k + 1) + head(h).sin().mean() for k, (t, head) in heads}


@pytest.mark.parametrize(("engine", "strategy"), ENGINES)
def test_sparse_embedding_is_measured_and_its_grad_stays_sparse(engine, strategy):
    torch.manual_seed(0)
    model = SparseNet()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 30, (4, 7))
    with monitor_for(model, engine, strategy) as monitor:
        report = monitor.backward(model(ids))
        losses = twin(ids)
        expected = oracle_gram(losses, [twin.emb.weight, *twin.lin.parameters()])
        sum(losses.values()).backward()
    assert sorted(monitor.shared_parameters) == ["emb.weight", "lin.bias", "lin.weight"]
    assert model.emb.weight.grad.is_sparse
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= RTOL, name
    assert rel_err(report.gram, expected) <= GRAM_RTOL
    assert report.strategy == expected_route(engine, strategy)
    # the batched pass covers the sparse table by the Embedding rule (autograd is never asked for its gradient)
    assert report.layers["emb"].route == {"batched": "materialised", "loop": "autograd"}.get(strategy, "reference")


# ------------------------------------------------------------------------------------------------ functional_call
@pytest.mark.parametrize("strategy", ["batched", "loop"])
def test_functional_call_with_substituted_parameters_measures_the_parameters_used(strategy):
    """Substitutes that are functions of the parameters (2 p: the parameters get twice the gradient) and others
    (a frozen copy, which the parameters do not see): the Gram is the real parameters' gradients' Gram."""
    torch.manual_seed(0)
    model = Net()
    frozen = copy.deepcopy(model.backbone[2]).requires_grad_(False)
    x, y = torch.randn(10, 5), torch.randn(10, 1)

    def run():
        substitutes = {"0.weight": 2 * model.backbone[0].weight, "2.weight": frozen.weight}
        h = torch.func.functional_call(model.backbone, substitutes, (x,), strict=False)
        return model.losses(h, y)

    with ConflictMonitor(model, shared=model.backbone, strategy=strategy) as monitor:
        losses = run()
        report = monitor.measure(losses)
        expected = oracle_gram(losses, list(model.backbone.parameters()))
    assert rel_err(report.gram, expected) <= GRAM_RTOL
    assert report.strategy == strategy
    if strategy == "batched":  # the substituted weights take the autograd route, the biases stay with the rule
        assert report.layers["backbone.0"].route == "autograd+materialised"


# ------------------------------------------------------------------------------------------------ hooks
def _rescale(module, args, output):
    return output * 2.0 if isinstance(module, nn.Linear) and output.shape[-1] == 8 else None


def _shift_input(module, args):
    return (args[0] + 0.5,) if isinstance(module, nn.Linear) and args[0].shape[-1] == 8 else None


def _kwargs_hook(module, args, kwargs, output):
    return _rescale(module, args, output)


HOOKS = {
    "global forward": lambda m: register_module_forward_hook(_rescale),
    "global forward with_kwargs": lambda m: register_module_forward_hook(_kwargs_hook, with_kwargs=True),
    "global forward always_call": lambda m: register_module_forward_hook(_rescale, always_call=True),
    "global forward pre": lambda m: register_module_forward_pre_hook(_shift_input),
    "module forward": lambda m: m.backbone[2].register_forward_hook(_rescale),
    "module forward with_kwargs": lambda m: m.backbone[2].register_forward_hook(_kwargs_hook, with_kwargs=True),
    "module forward always_call": lambda m: m.backbone[2].register_forward_hook(_rescale, always_call=True),
    "module forward prepend": lambda m: m.backbone[2].register_forward_hook(_rescale, prepend=True),
    "module forward pre": lambda m: m.backbone[2].register_forward_pre_hook(_shift_input),
}


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_user_forward_hooks_that_rewrite_inputs_or_outputs(hook, order):
    """Every hook kind, registered before the monitor or after it (after its first measured step): the Gram is
    the oracle's, by the batched pass with the layer rules."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(10, 5), torch.randn(10, 1)
    handle = HOOKS[hook](model) if order == "before" else None
    try:
        with ConflictMonitor(model, shared=model.backbone, strategy="batched") as monitor:
            monitor.measure(model(x, y))
            if handle is None:
                handle = HOOKS[hook](model)
            losses = model(x, y)
            report = monitor.measure(losses)
            expected = oracle_gram(losses, list(model.backbone.parameters()))
    finally:
        handle.remove()
        # torch 2.13's handle leaves a global with-kwargs hook's id behind (gradconflict's own hook cleans it too)
        nn_module._global_forward_hooks_with_kwargs.pop(handle.id, None)
    assert rel_err(report.gram, expected) <= GRAM_RTOL, hook
    for name in ("backbone.0", "backbone.2"):
        assert rel_err(report.layers[name].gram, oracle_gram(losses, list(model.get_submodule(name).parameters()))) \
            <= GRAM_RTOL
    assert report.strategy == "batched"
    assert {report.layers[n].route for n in ("backbone.0", "backbone.2")} <= {"ghost", "materialised"}
    assert not nn_module._has_any_global_hook()


# ------------------------------------------------------------------------------------------------ buffers
class BigBuffer(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.lin = nn.Linear(5, 8)
        self.register_buffer("table", torch.zeros(size))

    def forward(self, x):
        return self.lin(x) + self.table[:1]


def test_a_measurement_without_checkpoint_copies_no_buffer():
    """A 32 MB buffer: a measured step's peak memory stays far below it (each step used to copy every buffer)."""
    torch.manual_seed(0)
    model = Net(BigBuffer(2**22))  # float64
    model.backbone.insert(1, nn.BatchNorm1d(8))
    x, y = torch.randn(10, 5), torch.randn(10, 1)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        monitor.measure(model(x, y))  # warm-up
        losses = model(x, y)
        peak = peak_bytes(lambda: monitor.measure(losses))
    assert peak < 2**22 * 8 // 16


def test_a_checkpointed_segment_copies_only_its_own_buffers():
    """The recomputed BatchNorm's statistics are copied and put back; the big buffer outside the segment is not."""
    torch.manual_seed(0)
    model = Net(BigBuffer(2**22))
    model.backbone.insert(3, nn.BatchNorm1d(8))
    block = model.backbone[3]
    x, y = torch.randn(10, 5), torch.randn(10, 1)
    h = model.backbone[2](model.backbone[1](model.backbone[0](x)))
    losses = model.losses(model.backbone[4](checkpoint(block, h, use_reentrant=True)), y)
    stats, version = block.running_mean.clone(), block.running_mean._version
    guard = BufferGuard(model)
    with ConflictMonitor(model, shared=model.backbone) as monitor, guard:
        report = monitor.measure(losses)
        copied = guard.copied
    assert not report.skipped
    assert 0 < copied < 2**22 * 8
    assert torch.equal(block.running_mean, stats) and block.running_mean._version == version
