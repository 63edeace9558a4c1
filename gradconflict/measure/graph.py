"""Walks of the autograd graph: which leaves a loss reaches, how often each is used, which tapped module calls
and which special nodes (activation checkpoints, compiled regions) lie on the way.

>>> import torch
>>> w = torch.ones(2, requires_grad=True)
>>> g = walk_graph([(w * 2).sum() + (w * 3).sum()])
>>> g.uses[id(w)], len(g.leaves)
(2, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["CHECKPOINT_NODE", "OPAQUE_NODES", "Graph", "depends_on", "leaves_of", "walk_graph"]

#: The node that ``torch.utils.checkpoint(..., use_reentrant=True)`` leaves in the graph: the checkpointed
#: segment's own nodes only exist while its backward recomputes it.
CHECKPOINT_NODE = "CheckpointFunctionBackward"

#: Nodes whose inside the monitor cannot see or batch: a ``torch.compile``'d region's backward runs as one
#: compiled function, which refuses to run under ``vmap``.
OPAQUE_NODES = frozenset({"CompiledFunctionBackward"})

# Autograd nodes that only re-view, transpose or cast a tensor: a parameter reached through one of them is used
# wherever that node's output is used.
_ALIAS_NODES = frozenset(
    {
        "TBackward0",
        "ToCopyBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
        "AliasBackward0",
        "UnsqueezeBackward0",
    }
)


@dataclass
class Graph:
    """What one walk of the autograd graph found.

    Attributes:
        leaves: every leaf tensor that requires grad, in discovery order.
        calls: the tapped module calls (the ``gc_call`` of each tap node).
        uses: for each leaf (by id), how many operations consume it (see :func:`walk_graph`).
        checkpoints: the reentrant activation-checkpoint nodes.
        opaque: names of the node types met that hide their inside (compiled regions).
    """

    leaves: list[Tensor] = field(default_factory=list)
    calls: list[Any] = field(default_factory=list)
    uses: dict[int, int] = field(default_factory=dict)
    checkpoints: list[Any] = field(default_factory=list)
    opaque: set[str] = field(default_factory=set)


def walk_graph(roots: Sequence[Tensor]) -> Graph:
    """Walk the autograd graph below ``roots`` once.

    A leaf's *uses* count the operations that consume it, looking through alias nodes (transpose, view,
    dtype cast), so that a Linear weight used by one call counts 1 and a weight tied into two places counts 2
    even when autocast casts it once for both.
    """
    graph = Graph()
    accumulators = []
    parents: dict[Any, list[Any]] = {}  # node -> the nodes that feed it, one entry per edge
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        kind = type(node).__name__
        call = getattr(node, "gc_call", None)
        if call is not None:
            graph.calls.append(call)
        elif kind == CHECKPOINT_NODE:
            graph.checkpoints.append(node)
        elif kind in OPAQUE_NODES:
            graph.opaque.add(kind)
        variable = getattr(node, "variable", None)
        if variable is not None:
            graph.leaves.append(variable)
            accumulators.append(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            feeders = parents.get(child)
            if feeders is None:
                parents[child] = [node]
            else:
                feeders.append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)

    def uses(node: Any) -> int:
        total = 0
        for parent in parents.get(node, ()):
            alias = type(parent).__name__ in _ALIAS_NODES and sum(c is not None for c, _ in parent.next_functions) == 1
            total += uses(parent) if alias else 1
        return total

    for leaf, node in zip(graph.leaves, accumulators):
        graph.uses[id(leaf)] = uses(node)
    return graph


Expand = Callable[[Any], Sequence[Tensor]]


def leaves_of(root: Tensor, expand: Expand | None = None) -> list[Tensor]:
    """The leaf tensors requiring grad that ``root`` depends on.

    A reentrant checkpoint hides its segment's parameters; ``expand(node)`` lists them (see
    :func:`gradconflict.measure.checkpoint.segment_leaves`), otherwise they are not reported.
    """
    graph = walk_graph([root])
    found = {id(t): t for t in graph.leaves}
    if expand is not None:
        for node in graph.checkpoints:
            for t in expand(node):
                found.setdefault(id(t), t)
    return list(found.values())


def depends_on(root: Tensor, targets: Iterable[Tensor], expand: Expand | None = None) -> bool:
    """Whether ``root``'s graph reaches any of ``targets`` (leaves), stopping at the first one found.

    With ``expand``, a reentrant checkpoint reaches the leaves ``expand(node)`` lists.
    """
    wanted = {id(t) for t in targets}
    stack = [root.grad_fn] if root.grad_fn is not None else []
    seen = set(stack)
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in wanted:
            return True
        if expand is not None and type(node).__name__ == CHECKPOINT_NODE:
            if any(id(t) in wanted for t in expand(node)):
                return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False
