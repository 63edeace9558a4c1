"""The timed routes. Each is one full training step on its own copy of the model (same weights, same batch):
forward, the route's gradient work, and ``.grad`` filled with the gradient of ``sum_i L_i`` (all task weights
are 1). A route returns the T x T Gram of the task gradients over the backbone's parameters, or ``None``.

Every route has its own deep copy of the model so that one route's hooks (gradconflict's taps, TorchJD's
module hooks, the floor's anchor) never slow another route down.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.workloads import MultiTask, per_sample_losses, task_losses

#: route key -> (table label, one-line definition); table order
ROUTES: dict[str, tuple[str, str]] = {
    "plain": ("(a) plain step", "forward + `sum(losses).backward()`; no Gram"),
    "floor": (
        "floor",
        "forward + one vmapped VJP of the T losses to a zero anchor added to the first layer's output (all "
        "activation gradients for T tasks, no weight gradient) + one `backward` of the summed loss onto the "
        "parameters; no Gram work",
    ),
    "naive": (
        "(b) naive loop",
        "forward + T `autograd.grad(L_i, backbone + head_i params)`, flatten, `J @ J.T`, sum into `.grad`",
    ),
    "batched": (
        "(c) batched backward",
        "forward + `vmap(autograd.grad)(eye(T))` over all params -> [T, ...] each, flatten backbone, `J @ J.T`, "
        "sum over T into `.grad`",
    ),
    "torchjd": (
        "(d) TorchJD autogram",
        "TorchJD 0.18 `Engine(backbone, batch_dim=None).compute_gramian(stack(losses))` + "
        "`stack(losses).backward(w)`",
    ),
    "torchjd-b0": (
        "(d') TorchJD batch_dim=0",
        "TorchJD `Engine(backbone, batch_dim=0)` on the [B, T] per-sample losses -> BT x BT Gramian, summed "
        "to T x T / B^2, + weighted backward (not applicable with BatchNorm)",
    ),
    "gc": (
        "(e) gradconflict default",
        "`ConflictMonitor(model, shared=model.backbone).backward(losses)` (strategy auto: the batched pass and the "
        "per-task loop timed on the first measured steps, the faster kept; the note says which)",
    ),
    "gc-batched": ("(e1) gradconflict batched", '`ConflictMonitor(..., strategy="batched").backward`'),
    "gc-loop": ("(e2) gradconflict loop", '`ConflictMonitor(..., strategy="loop").backward` (one backward per task)'),
    "gc-every10": (
        "(f) gradconflict every=10",
        "`ConflictMonitor(..., every=10).backward` over 10 consecutive steps (1 measured), time / 10",
    ),
    "gc-repr": ("(g) gradconflict representation", '`ConflictMonitor(..., engine="representation").backward`'),
}

#: routes run only when asked for with --routes (TorchJD's batch_dim=0 mode costs seconds per step here)
OPT_IN = ("torchjd-b0",)

#: routes whose Gram is exact (their fp32 error is checked)
EXACT = ("naive", "batched", "torchjd", "torchjd-b0", "gc", "gc-batched", "gc-loop", "gc-every10")


class Skip(Exception):
    """The route does not apply here (missing peer, engine not available, ...)."""


@dataclass
class Route:
    key: str
    model: MultiTask
    step: Callable[[], Tensor | None]  # one call; returns the Gram (or None)
    steps_per_call: int = 1
    approximate: bool = False
    closers: list[Callable[[], None]] = field(default_factory=list)
    note: str = ""
    describe: Callable[[], str] | None = None  # more note, read after the timed runs
    trial_calls: int = 0  # calls that time strategies (gradconflict's auto): run before the memory probe

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def close(self) -> None:
        for c in self.closers:
            c()


def shared_params(model: MultiTask) -> list[nn.Parameter]:
    return [p for p in model.backbone.parameters() if p.requires_grad]


def _stack(losses: dict[str, Tensor]) -> Tensor:
    return torch.stack(list(losses.values()))


def _gram(rows: list[Tensor]) -> Tensor:
    J = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
    return J @ J.T


def plain(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
    def step() -> None:
        sum(task_losses(model(x), targets).values()).backward()

    return Route("plain", model, step)


def floor(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
    T = len(targets)
    first = next(m for m in model.backbone.modules() if any(True for _ in m.parameters(recurse=False)))
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = params[0].dtype  # not x's: token ids are integers
    eye = torch.eye(T, dtype=dtype, device=x.device)
    closers = []
    if isinstance(first, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)):
        anchor = torch.zeros((), dtype=dtype, device=x.device, requires_grad=True)
        handle = first.register_forward_hook(lambda mod, args, out: out + anchor)
        closers.append(handle.remove)
        inp, note = x, f"anchor on the output of the first layer ({type(first).__name__})"
    else:  # e.g. attention first: its input projection needs its output gradients too, so go down to x
        anchor = inp = x.detach().requires_grad_(True)
        note = f"anchor = the input x (the first layer, {type(first).__name__}, is not a plain Linear/Conv/Embedding)"

    def step() -> None:
        stacked = _stack(task_losses(model(inp), targets))
        torch.func.vmap(lambda v: torch.autograd.grad(stacked, [anchor], v, retain_graph=True))(eye)
        stacked.sum().backward(inputs=params)

    return Route("floor", model, step, closers=closers, note=note)


def naive(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
    shared = shared_params(model)
    heads = {k: [p for p in h.parameters() if p.requires_grad] for k, h in model.heads.items()}
    n = len(shared)

    def step() -> Tensor:
        losses = task_losses(model(x), targets)
        T = len(losses)
        rows, total = [], None
        for i, (k, loss) in enumerate(losses.items()):
            grads = torch.autograd.grad(loss, shared + heads[k], retain_graph=i < T - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads[:n]]))
            for p, g in zip(heads[k], grads[n:]):  # each head gets gradient from its own task only
                p.grad = g
            if total is None:
                total = list(grads[:n])
            else:
                for acc, g in zip(total, grads[:n]):
                    acc.add_(g)
        for p, g in zip(shared, total):
            p.grad = g
        J = torch.stack(rows)
        return J @ J.T

    return Route("naive", model, step)


def batched(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
    shared = shared_params(model)
    ids = {id(p) for p in shared}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    params = shared + others
    n = len(shared)
    eye = torch.eye(len(targets), dtype=x.dtype, device=x.device)

    def step() -> Tensor:
        stacked = _stack(task_losses(model(x), targets))
        per_task = torch.func.vmap(lambda v: torch.autograd.grad(stacked, params, v))(eye)
        for p, g in zip(params, per_task):
            p.grad = g.sum(0)
        return _gram(list(per_task[:n]))

    return Route("batched", model, step)


def _torchjd_engine(model: MultiTask, batch_dim: int | None) -> object:
    try:
        from torchjd.autogram import Engine
    except ImportError as e:
        raise Skip(f"TorchJD not installed ({e}); `pip install torchjd` to include it") from e
    return Engine(model.backbone, batch_dim=batch_dim)


def torchjd(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
    engine = _torchjd_engine(model, None)

    def step() -> Tensor:
        stacked = _stack(task_losses(model(x), targets))
        gram = engine.compute_gramian(stacked)
        stacked.backward(torch.ones_like(stacked))
        return gram

    return Route("torchjd", model, step)


def torchjd_b0(model: MultiTask, x: Tensor, targets: dict[str, Tensor], batchnorm: bool = False) -> Route:
    if batchnorm:
        raise Skip("BatchNorm couples the samples: TorchJD's batch_dim=0 mode does not apply")
    engine = _torchjd_engine(model, 0)
    T, B = len(targets), x.shape[0]

    def step() -> Tensor:
        ps = torch.stack(list(per_sample_losses(model(x), targets).values()), dim=1)  # [B, T]
        gram = engine.compute_gramian(ps).reshape(B, T, B, T).sum((0, 2)) / (B * B)
        ps.backward(torch.full_like(ps, 1.0 / B))
        return gram

    return Route("torchjd-b0", model, step)


def _monitor(model: MultiTask, **kwargs: object) -> object:
    from gradconflict import ConflictMonitor

    try:
        return ConflictMonitor(model, shared=model.backbone, **kwargs)
    except ValueError as e:
        raise Skip(f"gradconflict: {e}") from e


def _gc(key: str, **kwargs: object) -> Callable[[MultiTask, Tensor, dict[str, Tensor]], Route]:
    def build(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
        monitor = _monitor(model, **kwargs)

        def step() -> Tensor:
            return monitor.backward(task_losses(model(x), targets)).gram

        def describe() -> str:
            chosen = {c["strategy"] for c in monitor.plan["choices"] if c["strategy"]}
            return f"strategy chosen: {', '.join(sorted(chosen))}" if chosen else ""

        trials = 4 if kwargs.get("strategy", "auto") == "auto" else 0  # 2 trial steps per candidate
        return Route(key, model, step, closers=[monitor.close], describe=describe, trial_calls=trials)

    return build


gc = _gc("gc")


def gc_every10(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
    monitor = _monitor(model, every=10)

    def step() -> Tensor:
        gram = None
        for _ in range(10):
            model.zero_grad(set_to_none=True)
            report = monitor.backward(task_losses(model(x), targets))
            if report is not None:
                gram = report.gram
        return gram

    return Route("gc-every10", model, step, steps_per_call=10, closers=[monitor.close], trial_calls=4)


def gc_repr(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> Route:
    monitor = _monitor(model, engine="representation")

    def step() -> Tensor:
        return monitor.backward(task_losses(model(x), targets)).gram

    approximate = bool(getattr(monitor.engine, "approximate", True))
    note = "approximate: G rel err compares it with the exact Gram" if approximate else ""
    return Route("gc-repr", model, step, approximate=approximate, closers=[monitor.close], note=note)


BUILDERS = {
    "plain": plain, "floor": floor, "naive": naive, "batched": batched, "torchjd": torchjd,
    "torchjd-b0": torchjd_b0, "gc": gc, "gc-batched": _gc("gc-batched", strategy="batched"),
    "gc-loop": _gc("gc-loop", strategy="loop"), "gc-every10": gc_every10, "gc-repr": gc_repr,
}


def build(key: str, base: MultiTask, x: Tensor, targets: dict[str, Tensor], *, batchnorm: bool = False) -> Route:
    """Route ``key`` on a fresh copy of ``base``; raises :class:`Skip` when it does not apply."""
    model = copy.deepcopy(base)
    if key == "torchjd-b0":
        return torchjd_b0(model, x, targets, batchnorm=batchnorm)
    return BUILDERS[key](model, x, targets)


def reference(base: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Float64 oracle on a copy of ``base``: the Gram over the backbone and the summed gradient of every
    parameter (in ``base.parameters()`` order), from T separate ``autograd.grad`` calls."""
    model = copy.deepcopy(base).double()
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(shared_params(model))
    x = x.double() if x.is_floating_point() else x
    losses = task_losses(model(x), {k: t.double() for k, t in targets.items()})
    per_task = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        for loss in losses.values()
    ]
    # G_ij summed parameter by parameter: stacking J would hold a second float64 copy of T gradients (GPT-2, T=8)
    T = len(per_task)
    gram = torch.zeros(T, T, dtype=torch.float64)
    for k in range(n):
        rows = torch.stack([grads[k].reshape(-1) for grads in per_task])
        gram += (rows @ rows.T).cpu()
    total = [sum(grads[k] for grads in per_task) for k in range(len(params))]
    return gram, total
