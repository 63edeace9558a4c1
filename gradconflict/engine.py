"""Engines: produce the per-layer task-gradient Grams of one step and, in the same pass, the weighted
training gradient of every parameter.

* :class:`TappedEngine` (``engine="auto"``): one vectorised VJP over the T task losses
  (``torch.func.vmap`` over ``torch.autograd.grad``). Each tapped module receives its ``[T, ...]`` output
  gradients as the backward reaches it; its layer rule turns them into the layer's Gram and weighted gradient
  and they are dropped at once. Parameters no rule covers are materialised (T gradients each), their Gram taken.
* :class:`ReferenceEngine` (``engine="reference"``): T separate ``torch.autograd.grad`` calls; slow, obvious,
  the oracle of the tests.

Both return an :class:`EngineResult`; neither touches ``.grad`` (the monitor writes it, all at once).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradconflict.capture import Capture, OutputCapture, walk_graph
from gradconflict.rules import Call
from gradconflict.rules.base import gram_of, weighted

__all__ = [
    "EngineResult",
    "LayerGram",
    "PerformanceWarning",
    "Plan",
    "ReferenceEngine",
    "RepresentationEngine",
    "TappedEngine",
    "make_engine",
]


class PerformanceWarning(UserWarning):
    """The engine ran part of its batched backward as a per-task loop (an op without a vmap batching rule)."""


_FALLBACK = re.compile(r"batching rule for (\S+?)\.? ")


def _batched(fn: Callable[[Tensor], tuple[Tensor, ...]], eye: Tensor, reported: set[str]) -> tuple[Tensor, ...]:
    """``torch.func.vmap(fn)(eye)``, turning torch's per-op fallback warnings into one clear warning per op.

    An op without a batching rule makes vmap loop over the T tasks for that op: exact, but that layer then costs
    T backward passes. It must never happen silently on the default path.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.func.vmap(fn)(eye)
    for w in caught:
        match = _FALLBACK.search(str(w.message))
        if match is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif match.group(1) not in reported:
            reported.add(match.group(1))
            warnings.warn(
                f"gradconflict: {match.group(1)} has no vmap batching rule in torch {torch.__version__}, so the "
                f"batched backward loops over the {eye.shape[0]} tasks for it (exact, but slower). On CPU this is "
                "the fused attention backward: use the math attention kernel or measure less often (every=k)",
                PerformanceWarning,
                stacklevel=4,
            )
    return out


@dataclass
class Plan:
    """What the monitor knows about the model: which parameters are shared and which layer owns each.

    ``layer_of`` maps ``id(parameter)`` to the name of the layer (owning module) it belongs to.
    """

    shared: set[int]
    layer_of: dict[int, str]
    module_name: dict[nn.Module, str]
    gram_dtype: torch.dtype
    capture: Capture | None = None
    representation: OutputCapture | None = None


@dataclass
class LayerGram:
    """One layer's Gram, its number of shared parameter entries and the routes that produced it."""

    gram: Tensor
    num_params: int = 0
    routes: set[str] = field(default_factory=set)

    @property
    def route(self) -> str:
        """The routes taken, joined by ``+``."""
        return "+".join(sorted(self.routes))


@dataclass
class EngineResult:
    """Per-layer Grams (summing to ``gram``) and the weighted gradient of every leaf, keyed by leaf id."""

    gram: Tensor
    layers: dict[str, LayerGram]
    grads: dict[int, tuple[Tensor, Tensor]]


def _stacked(losses: Sequence[Tensor]) -> Tensor:
    """The T scalar losses as one ``[T]`` tensor, the root of every engine's backward."""
    return torch.stack([loss.reshape(()) for loss in losses])


def _leaves(stacked: Tensor, plan: Plan) -> list[Tensor]:
    """Every leaf the losses depend on, less the taps' anchors."""
    capture = plan.capture
    return [t for t in walk_graph([stacked]).leaves if capture is None or not capture.is_anchor(t)]


class _Accumulator:
    """Collects layer Grams and weighted gradients as they arrive during one pass."""

    def __init__(self, weights: Tensor, plan: Plan) -> None:
        self.weights = weights
        self.plan = plan
        self.layers: dict[str, LayerGram] = {}
        self.grads: dict[int, tuple[Tensor, Tensor]] = {}

    def add_grad(self, leaf: Tensor, grad: Tensor) -> None:
        key = id(leaf)
        self.grads[key] = (leaf, grad if key not in self.grads else self.grads[key][1] + grad)

    def add_gram(self, layer: str, gram: Tensor, num_params: int, route: str) -> None:
        entry = self.layers.get(layer)
        if entry is None:
            self.layers[layer] = entry = LayerGram(torch.zeros_like(gram))
        entry.gram += gram
        entry.num_params += num_params
        entry.routes.add(route)

    def add_materialised(self, leaf: Tensor, per_task: Tensor) -> None:
        """A leaf's T gradients ``[T, *leaf.shape]``: its weighted gradient and, if shared, its Gram."""
        self.add_grad(leaf, weighted(self.weights, per_task).to(leaf.dtype))
        if id(leaf) in self.plan.shared:
            gram = gram_of(per_task.to(self.plan.gram_dtype).flatten(1))
            self.add_gram(self.plan.layer_of[id(leaf)], gram, leaf.numel(), "materialised")

    def result(self, T: int, device: torch.device) -> EngineResult:
        gram = torch.zeros(T, T, dtype=self.plan.gram_dtype, device=device)
        for entry in self.layers.values():
            gram += entry.gram
        return EngineResult(gram, self.layers, self.grads)


class _TappedPass(_Accumulator):
    """One batched backward: receives each tapped call's output gradients and runs its layer rule."""

    def __init__(
        self, weights: Tensor, plan: Plan, calls: dict[nn.Module, list[Call]], covered: dict[nn.Module, set[str]]
    ) -> None:
        super().__init__(weights, plan)
        self.num_tasks = weights.shape[0]
        self.expected = {m: len(c) for m, c in calls.items()}
        self.covered = covered
        self.pending: dict[nn.Module, list[Call]] = defaultdict(list)

    def receive(self, call: Call, grads: Tensor) -> None:
        module = call.module
        if not self.covered.get(module):
            return
        call.grads = grads
        self.pending[module].append(call)
        if len(self.pending[module]) == self.expected[module]:
            self._compute(module)

    def _compute(self, module: nn.Module) -> None:
        calls = [c for c in self.pending.pop(module) if c.grads is not None]
        if not calls:
            return
        rule = calls[0].rule
        params = rule.params(module)
        covered = self.covered[module]
        shared = {n for n in covered if id(params[n]) in self.plan.shared}
        out = rule.compute(module, calls, covered, shared, self.weights, self.plan.gram_dtype)
        for c in calls:
            c.grads = None  # free the [T, ...] output gradients as soon as the layer is done
        for name, grad in out.grads.items():
            self.add_grad(params[name], grad)
        if out.gram is not None:
            layer = self.plan.module_name[module]
            self.add_gram(layer, out.gram, sum(params[n].numel() for n in shared), out.route)

    def finish(self) -> None:
        """Run the rules of modules whose calls did not all arrive (some calls were off the loss graph)."""
        for module in list(self.pending):
            self._compute(module)


class TappedEngine:
    """The default engine: one vectorised VJP, per-layer rules, book-keeping in the same pass."""

    name = "auto"
    approximate = False

    def __init__(self) -> None:
        self.fallbacks: set[str] = set()

    def run(self, losses: Sequence[Tensor], weights: Tensor, plan: Plan, *, keep_graph: bool) -> EngineResult:
        """The per-layer Grams and weighted gradients of one step (``keep_graph``: leave the graph alive)."""
        capture = plan.capture
        stacked = _stacked(losses)
        graph = walk_graph([stacked])
        is_anchor = capture.is_anchor if capture is not None else (lambda t: False)
        anchors = [t for t in graph.leaves if is_anchor(t)]
        leaves = [t for t in graph.leaves if not is_anchor(t)]

        calls: dict[nn.Module, list[Call]] = defaultdict(list)
        for call in graph.calls:
            if call.owner is capture:  # another monitor's taps on the same model are not ours
                calls[call.module].append(call)
        claims = Counter(id(p) for m in calls for p in calls[m][0].rule.params(m).values())
        covered: dict[nn.Module, set[str]] = {}
        for module, module_calls in calls.items():
            # A rule covers a parameter only when every use of it is one of this module's calls: a parameter
            # tied elsewhere or used outside the module's forward goes to the generic route instead.
            covered[module] = {
                name
                for name, p in module_calls[0].rule.params(module).items()
                if claims[id(p)] == 1 and graph.uses.get(id(p), 0) == len(module_calls)
            }
        covered_ids = {id(getattr(m, n)) for m, names in covered.items() for n in names}
        generic = [t for t in leaves if id(t) not in covered_ids]

        current = _TappedPass(weights, plan, calls, covered)
        inputs = anchors + generic
        T = len(losses)
        if inputs:
            eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)

            def vjp(v: Tensor) -> tuple[Tensor, ...]:
                return torch.autograd.grad(stacked, inputs, v, retain_graph=keep_graph, materialize_grads=True)

            if capture is not None:
                capture.receiver = current
            try:
                per_task = _batched(vjp, eye, self.fallbacks)
            finally:
                if capture is not None:
                    capture.receiver = None
            current.finish()
            for leaf, g in zip(generic, per_task[len(anchors) :]):
                current.add_materialised(leaf, g)
        return current.result(T, stacked.device)


class ReferenceEngine:
    """T separate ``torch.autograd.grad`` calls over every leaf: the exact, slow oracle."""

    name = "reference"
    approximate = False

    def run(self, losses: Sequence[Tensor], weights: Tensor, plan: Plan, *, keep_graph: bool) -> EngineResult:
        """The per-layer Grams and weighted gradients of one step (``keep_graph``: leave the graph alive)."""
        leaves = _leaves(_stacked(losses), plan)
        acc = _Accumulator(weights, plan)
        T = len(losses)
        per_task = [
            torch.autograd.grad(
                loss, leaves, retain_graph=keep_graph or i < T - 1, allow_unused=True, materialize_grads=True
            )
            for i, loss in enumerate(losses)
        ]
        for k, leaf in enumerate(leaves):
            acc.add_materialised(leaf, torch.stack([g[k] for g in per_task]))
        for entry in acc.layers.values():
            entry.routes = {"reference"}
        return acc.result(T, losses[0].device)


class RepresentationEngine:
    """MGDA-UB's approximation: the Gram of the task gradients with respect to the shared module's *output*.

    Near free (T small backward passes through the heads only, then a plain backward for ``.grad``), but it is
    not the Gram over the parameters: reports from it are marked ``approximate``.
    """

    name = "representation"
    approximate = True

    def run(self, losses: Sequence[Tensor], weights: Tensor, plan: Plan, *, keep_graph: bool) -> EngineResult:
        """The per-layer Grams and weighted gradients of one step (``keep_graph``: leave the graph alive)."""
        capture = plan.representation
        if capture is None or capture.output is None:
            raise RuntimeError(
                "engine='representation' found no output of the shared module in this step's forward: pass "
                "shared=<the backbone module> and run the model's forward before monitor.backward()"
            )
        Z = capture.output
        stacked = _stacked(losses)
        # One small backward per task: each reaches Z through its own head only, which costs less than a vmapped
        # pass that carries every task through every head.
        per_task = torch.stack(
            [torch.autograd.grad(loss, [Z], retain_graph=True, materialize_grads=True)[0] for loss in losses]
        )
        gram = gram_of(per_task.to(plan.gram_dtype).flatten(1))
        grads: dict[int, tuple[Tensor, Tensor]] = {}
        if not keep_graph:
            leaves = _leaves(stacked, plan)
            for leaf, g in zip(leaves, torch.autograd.grad(stacked @ weights.to(stacked.dtype), leaves)):
                grads[id(leaf)] = (leaf, g)
        capture.output = None
        layer = LayerGram(gram, num_params=Z[0].numel(), routes={"representation"})
        return EngineResult(gram, {capture.name: layer}, grads)


ENGINES = {"auto": TappedEngine, "reference": ReferenceEngine, "representation": RepresentationEngine}


def make_engine(name: str) -> TappedEngine | ReferenceEngine | RepresentationEngine:
    """The engine called ``name`` (one of :data:`ENGINES`)."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]()
