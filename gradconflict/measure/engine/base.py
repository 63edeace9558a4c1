"""What every engine shares: the plan it measures by, the per-layer result it returns, and the accumulator of
per-layer Grams and materialised per-task gradients."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from gradconflict.measure.rules.base import gram_of
from gradconflict.measure.shared import layer_ranks

if TYPE_CHECKING:
    from gradconflict.measure.distributed import Reduction

__all__ = [
    "Accumulator",
    "Engine",
    "LayerResult",
    "Measurement",
    "MeasurementRefused",
    "NothingLearned",
    "PerformanceWarning",
    "Plan",
    "is_measuring",
    "measuring",
    "warn_once",
]

_state = threading.local()


def is_measuring() -> bool:
    """Whether gradconflict is running its measuring backward in this thread right now.

    The measurement is a backward pass of its own (batched over the tasks, or one per task), so backward hooks
    on modules and activations run during it too, and see the tasks' gradients (batched inside ``vmap``). A
    hook that must only act on the training backward can return early when this is true:

    >>> def log_grad(grad):
    ...     if is_measuring():
    ...         return None
    ...     print("training gradient", grad.shape)
    >>> is_measuring()
    False
    """
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Mark the block as gradconflict's measurement (see :func:`is_measuring`)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


class PerformanceWarning(UserWarning):
    """The engine measured part of a step in a slower way than its batched backward (an op without a vmap
    batching rule, or a model the batched backward cannot run), exactly but at a higher cost."""


class MeasurementRefused(ValueError):
    """The engine cannot measure this step as the model or its call is set up, and the message says what to
    change (e.g. ``engine="representation"`` without a forward of its shared module). The monitor lets it reach
    the user, before anything is written; any other error inside an engine becomes a skipped step instead."""


def warn_once(seen: set[str], key: str, message: str) -> None:
    """Warn ``message`` as a :class:`PerformanceWarning` the first time ``key`` is met (``seen`` remembers)."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, PerformanceWarning, stacklevel=4)


@dataclass
class Plan:
    """What the monitor knows about the model: which parameters are shared and which layer owns each.

    Attributes:
        shared: ids of the shared parameters (the ones measured).
        layer_of: parameter id -> the name of its layer (its owning module).
        module_name: module -> its layer name.
        gram_dtype: the dtype the Grams are accumulated in.
        leaf_of: parameter id -> the tensor the autograd graph holds for it, where that is another tensor (an
            FSDP2 module's unsharded copy); ``shared`` and ``layer_of`` know both.
        layer_rank: layer name -> its position from the bottom of the network (``model.named_modules()`` order,
            :func:`~gradconflict.measure.shared.layer_ranks`): the order of a measurement's layers.
    """

    shared: set[int]
    layer_of: dict[int, str]
    module_name: dict[nn.Module, str]
    gram_dtype: torch.dtype
    leaf_of: dict[int, Tensor] = field(default_factory=dict)
    layer_rank: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.layer_rank = layer_ranks(self.module_name)

    def leaf(self, p: Tensor) -> Tensor:
        """The tensor the autograd graph holds for parameter ``p``."""
        return self.leaf_of.get(id(p), p)


@dataclass
class LayerResult:
    """One layer's Gram, its number of shared parameter entries and the routes that produced it."""

    gram: Tensor
    num_params: int = 0
    routes: set[str] = field(default_factory=set)

    @property
    def route(self) -> str:
        """The routes taken, joined by ``+``."""
        return "+".join(sorted(self.routes))


@dataclass
class Measurement:
    """Per-layer Grams summing to ``gram`` (the layers bottom to top, in the model's order), and how the step was
    measured (``strategy``); ``samples``, the per-example attribution when one was asked for
    (:class:`gradconflict.measure.attribution.Attributor`)."""

    gram: Tensor
    layers: dict[str, LayerResult]
    strategy: str
    samples: Any = None


class Engine(Protocol):
    """An engine measures; the monitor schedules. Each engine owns whatever hooks it needs.

    Attributes:
        name: the ``engine=`` name it answers to.
        approximate: whether its Grams are an approximation (reports say so).
        strategy: how it runs a measured step (``"batched"``, ``"loop"``, ``"auto"`` or ``"representation"``).
    """

    name: str
    approximate: bool
    strategy: str

    def arm(self, on: bool) -> None:
        """Prepare (or not) the coming forwards for measurement."""

    def restrict(self, shared: set[int]) -> None:
        """The shared parameters are now known (ids)."""

    def measure(self, losses: Sequence[Tensor], plan: Plan, reduction: Reduction | None = None) -> Measurement:
        """The per-layer Grams of the task losses' gradients on the shared parameters; the graph stays alive.
        With a ``reduction``, the Grams are global over the processes."""
        ...

    def gradients(self, losses: Sequence[Tensor], plan: Plan) -> dict[int, tuple[Tensor, Tensor]]:
        """Every shared parameter's per-task gradients, materialised (``id -> (parameter, [T, *shape])``), for
        summing over micro-batches; the graph stays alive."""
        ...

    def state_dict(self) -> list[dict[str, Any]]:
        """What a resumed run restores (plain data; empty for an engine that learns nothing)."""
        ...

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Restore :meth:`state_dict`, all or nothing: a malformed state raises and changes nothing."""

    def close(self) -> None:
        """Remove every hook."""


class NothingLearned:
    """The state of an engine that learns nothing over a run (no strategy to choose): saved empty, and a saved
    list of another engine's choices is accepted and ignored, so a run may resume with another engine."""

    def state_dict(self) -> list[dict[str, Any]]:
        """Nothing to save."""
        return []

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Nothing to restore; ``state`` must still be a list (of another engine's choices)."""
        if not isinstance(state, list):
            raise ValueError(f"an engine state is a list of strategy choices, got a {type(state).__name__}")


class Accumulator:
    """Collects layer Grams, and the per-task gradients of parameters that are materialised, during one step.

    A materialised parameter may arrive in parts (from each recomputed checkpoint segment, or one task at a time
    in a per-task loop); its parts are summed first and its Gram taken once, in :meth:`result`, because a Gram
    is not additive over parts of a gradient. With a ``reduction`` (several processes), per-task gradients go
    through it instead of into a local Gram.
    """

    def __init__(
        self, num_tasks: int, plan: Plan, device: torch.device, reduction: Reduction | None = None
    ) -> None:
        self.num_tasks = num_tasks
        self.plan = plan
        self.device = device
        self.reduction = reduction
        self.layers: dict[str, LayerResult] = {}
        self._per_task: dict[int, tuple[Tensor, Tensor]] = {}

    def add_gram(self, layer: str, gram: Tensor, num_params: int, route: str) -> None:
        """Add a Gram (from a layer rule) to ``layer``."""
        entry = self._entry(layer)
        entry.gram += gram
        entry.num_params += num_params
        entry.routes.add(route)

    def add_rows(self, layer: str, rows: Tensor, num_params: int, route: str) -> Tensor | None:
        """Add the complete per-task gradients ``[T, P]`` of some of ``layer``'s parameters: their Gram, or,
        across processes, their share of the global Gram (see :mod:`gradconflict.measure.distributed`). Returns
        the global per-task gradients where the exact reduction formed them (``rows``, reduced in place)."""
        if self.reduction is None:
            self.add_gram(layer, gram_of(rows), num_params, route)
            return None
        total = self.reduction.add(layer, rows)
        entry = self._entry(layer)
        entry.num_params += num_params
        entry.routes.add(route)
        return total

    def _entry(self, layer: str) -> LayerResult:
        if layer not in self.layers:
            T = self.num_tasks
            self.layers[layer] = LayerResult(torch.zeros(T, T, dtype=self.plan.gram_dtype, device=self.device))
        return self.layers[layer]

    def add_per_task(self, leaf: Tensor, grads: Tensor, task: int | None = None) -> None:
        """Add materialised gradients of ``leaf``: all tasks' (``[T, *leaf.shape]``) or one ``task``'s. A sparse
        gradient (``nn.Embedding(sparse=True)`` on the per-task loop) is made dense: the loop's memory budget
        already counts T dense copies."""
        grads = (grads.to_dense() if grads.is_sparse else grads).to(self.plan.gram_dtype)
        key = id(leaf)
        if key not in self._per_task:
            shape = (self.num_tasks, *leaf.shape)
            self._per_task[key] = (leaf, grads if task is None else grads.new_zeros(shape))
            if task is None:
                return
        total = self._per_task[key][1]
        if task is None:
            total += grads
        else:
            total[task] += grads

    def gradients(self) -> dict[int, tuple[Tensor, Tensor]]:
        """The materialised per-task gradients so far: parameter id -> ``(parameter, [T, *shape])``."""
        return dict(self._per_task)

    def result(self, strategy: str) -> Measurement:
        """The step's measurement: the materialised parameters' Grams added, every layer summed, the layers bottom
        to top (:attr:`Plan.layer_rank`; they arrive in the order the backward reached them, top first)."""
        for leaf, per_task in self._per_task.values():
            # "autograd": per-task gradients asked of autograd (no rule covers them, or the per-task loop ran)
            self.add_rows(self.plan.layer_of[id(leaf)], per_task.flatten(1), leaf.numel(), "autograd")
        self._per_task.clear()
        if self.reduction is not None:
            for layer, gram in self.reduction.grams().items():
                self.layers[layer].gram += gram
        T = self.num_tasks
        gram = torch.zeros(T, T, dtype=self.plan.gram_dtype, device=self.device)
        for entry in self.layers.values():
            entry.gram = (entry.gram + entry.gram.T) / 2  # exactly symmetric (the ghost product is, up to rounding)
            gram += entry.gram
        rank = self.plan.layer_rank
        layers = dict(sorted(self.layers.items(), key=lambda item: rank.get(item[0], len(rank))))
        return Measurement(gram, layers, strategy)
