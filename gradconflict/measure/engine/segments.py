"""One recomputed reentrant-checkpoint segment inside a measuring backward (see :mod:`gradconflict.measure.checkpoint`).

The segment is recomputed (tapped, when the batched engine measures), its graph walked, and
``torch.autograd.grad`` run through it with the gradients that reached the checkpoint: the gradients of the
segment's inputs go back to the outer backward, and the shared parameters inside the segment are handed to the
engine's ``collect`` object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from gradconflict.measure.capture import Capture
from gradconflict.measure.checkpoint import recompute
from gradconflict.measure.graph import Graph, walk_graph

__all__ = ["Collector", "boundary_edges", "segment_backward"]


class Collector(Protocol):
    """What an engine does with a recomputed segment."""

    def begin(self, graph: Graph, exclude: set[int]) -> list[Tensor]:
        """The tensors to ask autograd for, inside the segment whose graph is ``graph`` (``exclude``: ids of the
        segment's own inputs)."""
        ...

    def end(self, requested: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Their gradients."""


def boundary_edges(checkpoints: Sequence[Any]) -> list[GradientEdge]:
    """The edges below each checkpoint node: asking autograd for their gradients makes it run the checkpoints
    even when no other requested tensor lies below them."""
    return [GradientEdge(child, nr) for node in checkpoints for child, nr in node.next_functions if child is not None]


def segment_backward(
    ctx: Any, grads: tuple[Tensor, ...], collect: Collector, *, capture: Capture | None
) -> tuple[Tensor | None, ...]:
    """The backward of a reentrant checkpoint (``ctx``) while measuring: recompute, then grad through."""
    if capture is not None:
        capture.recomputing += 1
    try:
        inputs, outputs = recompute(ctx)
    finally:
        if capture is not None:
            capture.recomputing -= 1
    pairs = [(o, g) for o, g in zip(outputs, grads) if isinstance(o, Tensor) and o.requires_grad]
    wanted = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    graph = walk_graph([o for o, _ in pairs])
    requested = collect.begin(graph, {id(t) for t in inputs if isinstance(t, Tensor)})
    if not pairs or not wanted + requested:
        collect.end(requested, [])
        return (None, None, *(None for _ in inputs))
    result = torch.autograd.grad(
        [o for o, _ in pairs], wanted + requested, [g for _, g in pairs], allow_unused=True, materialize_grads=True
    )
    collect.end(requested, result[len(wanted) :])
    found = iter(result[: len(wanted)])
    return (None, None, *(next(found) if isinstance(t, Tensor) and t.requires_grad else None for t in inputs))
