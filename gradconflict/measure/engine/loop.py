"""The per-task loop: T separate ``torch.autograd.grad`` calls over the shared parameters, their gradients
materialised and their Gram taken. Slow and obvious: ``engine="reference"``, and the route the batched engine
falls back to on graphs it cannot batch (compiled regions, ops whose batched backward fails)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradconflict.measure.capture import RetainedGrads
from gradconflict.measure.checkpoint import BufferGuard, measuring_segments
from gradconflict.measure.engine.base import Accumulator, Measurement, NothingLearned, Plan
from gradconflict.measure.engine.segments import boundary_edges, segment_backward
from gradconflict.measure.graph import Graph, walk_graph

if TYPE_CHECKING:
    from gradconflict.measure.distributed import Reduction

__all__ = ["ReferenceEngine", "loop_accumulate"]


class _TaskSegments:
    """Collects one task's gradients of the shared parameters inside recomputed checkpoint segments."""

    def __init__(self, acc: Accumulator, task: int) -> None:
        self.acc = acc
        self.task = task

    def begin(self, graph: Graph, exclude: set[int]) -> list[Tensor]:
        shared = self.acc.plan.shared
        return [t for t in graph.leaves if id(t) in shared and id(t) not in exclude]

    def end(self, requested: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        for leaf, g in zip(requested, grads):
            self.acc.add_per_task(leaf, g, task=self.task)


def loop_accumulate(
    losses: Sequence[Tensor], plan: Plan, graph: Graph | None = None, reduction: Reduction | None = None
) -> Accumulator:
    """The shared parameters' per-task gradients from T separate backward passes (T copies of them)."""
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    graph = walk_graph([stacked]) if graph is None else graph
    leaves: list[Any] = [t for t in graph.leaves if id(t) in plan.shared]  # tensors, then gradient edges below
    edges = boundary_edges(graph.checkpoints)
    acc = Accumulator(len(losses), plan, stacked.device, reduction)
    if leaves or edges:
        for i, loss in enumerate(losses):
            segments = _TaskSegments(acc, i)

            def handler(ctx: Any, grads: tuple[Tensor, ...], segments: _TaskSegments = segments) -> tuple[Any, ...]:
                return segment_backward(ctx, grads, segments, capture=None)

            # Each task's pass recomputes the checkpointed segments from the buffers the step's own backward will
            # see (a spectral norm's vectors, running statistics): what one task's recomputation moved is put back.
            with measuring_segments(handler) if edges else contextlib.nullcontext(), BufferGuard(plan.module_name):
                # Not materialize_grads: torch refuses it with gradient edges among the inputs, and a task that
                # does not reach a checkpointed segment (a layer above where it leaves the backbone) leaves its
                # edges unreached. The leaves it does not reach get zeros here, as materialising would give.
                grads = torch.autograd.grad(loss, [*leaves, *edges], retain_graph=True, allow_unused=True)
            for leaf, g in zip(leaves, grads):
                acc.add_per_task(leaf, torch.zeros_like(leaf) if g is None else g, task=i)
    return acc


class ReferenceEngine(NothingLearned):
    """``engine="reference"``: the per-task loop, for checking. It needs no hook."""

    name = "reference"
    approximate = False
    strategy = "loop"

    def __init__(self) -> None:
        self.retained = RetainedGrads()

    def arm(self, on: bool) -> None:
        """Nothing to prepare."""

    def restrict(self, shared: set[int]) -> None:
        """Nothing to restrict."""

    def measure(self, losses: Sequence[Tensor], plan: Plan, reduction: Reduction | None = None) -> Measurement:
        """The per-layer Grams from T separate backward passes."""
        with self.retained.kept():
            result = loop_accumulate(losses, plan, reduction=reduction).result("reference")
        for entry in result.layers.values():
            entry.routes = {"reference"}
        return result

    def gradients(self, losses: Sequence[Tensor], plan: Plan) -> dict[int, tuple[Tensor, Tensor]]:
        """Every shared parameter's per-task gradients, from T separate backward passes."""
        with self.retained.kept():
            return loop_accumulate(losses, plan).gradients()

    def close(self) -> None:
        """Stop noting retained activations."""
        self.retained.close()
