"""One ordinary backward that gives the shared parameters ``sum_i lambda_i w_i g_i`` and every task's own
parameters (its head) the gradient of its own loss ``w_i L_i``, as TorchJD's ``mtl_backward`` and the methods'
reference code do.

The autograd graph below the losses splits in two: the nodes whose gradient must arrive already weighted (the
*weighted part*) and the others. The weighted part holds every node that two or more tasks' losses reach (there
the tasks' gradients are mixed, so each must be weighted before it enters), and, when the shared parameters are
known, every node that one task alone reaches and from which only shared parameters are reached: the upper
layers of a backbone that one task leaves below another, or the whole backbone of a step with a single task.
Every path from a loss to a shared parameter enters the weighted part through exactly one edge leaving that task's
own nodes; a hook on those edges multiplies the gradient that crosses them by ``lambda_i``. So a single backward of
``sum_i w_i L_i`` (through autograd's own engine: tensor hooks, post-accumulate hooks, DDP's reducer and GradScaler
see an ordinary backward) leaves ``w_i`` times the head gradient in head ``i`` and ``sum_i lambda_i w_i g_i`` in
every shared parameter.

>>> import torch
>>> from gradconflict.measure.tasks import task_losses
>>> shared, head = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
>>> z = 2 * shared
>>> batch = task_losses({"a": (z * head).sum(), "b": z.sum()})
>>> _ = weighted_backward(batch, [0.5, 0.0], lambda total: total.backward())
>>> shared.grad, head.grad          # shared: 0.5 * d(z * head)/d shared + 0 * dz/d shared; head: its own gradient
(tensor([1.]), tensor([2.]))

With one task, the shared parameters (given by id) still get ``lambda_1 w_1 g_1``:

>>> w, h = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
>>> _ = weighted_backward(task_losses({"a": (3 * w * h).sum()}), [0.5], lambda t: t.backward(), shared={id(w)})
>>> w.grad, h.grad
(tensor([1.5000]), tensor([3.]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from gradconflict.measure.capture import is_tap_anchor
from gradconflict.measure.checkpoint import segment_module
from gradconflict.measure.graph import CHECKPOINT_NODE
from gradconflict.measure.tasks import TaskLosses

__all__ = ["COMMON", "owners", "weighted_backward"]

#: The owner of a node that two or more tasks' losses reach.
COMMON = -1


def _children(node: Any) -> list[Any]:
    return [child for child, _ in node.next_functions if child is not None]


def owners(roots: Sequence[Any]) -> dict[Any, int]:
    """For every node below ``roots`` (autograd nodes, one per task): the index of the only root that reaches it,
    or :data:`COMMON`. One walk per root, stopped where it meets nodes already known; a node found shared passes
    that on to everything below it once.

    >>> import torch
    >>> w = torch.ones(1, requires_grad=True)
    >>> h = w * 2
    >>> a, b = h * 3, h * 4
    >>> owner = owners([a.grad_fn, b.grad_fn])
    >>> owner[a.grad_fn], owner[b.grad_fn], owner[h.grad_fn] == COMMON
    (0, 1, True)
    """
    owner: dict[Any, int] = {}

    def share(node: Any) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            if owner.get(current) != COMMON:
                owner[current] = COMMON
                stack.extend(_children(current))

    for task, root in enumerate(roots):
        stack = [root]
        while stack:
            node = stack.pop()
            seen = owner.get(node)
            if seen is None:
                owner[node] = task
                stack.extend(_children(node))
            elif seen != task and seen != COMMON:
                share(node)
    return owner


def _only_shared(
    roots: Sequence[Any], shared: set[int], inside: Callable[[Any], Sequence[Tensor] | None]
) -> set[Any]:
    """The nodes below ``roots`` from which at least one leaf in ``shared`` (ids) and no other leaf is reached (the
    anchors of the monitor's taps, whose gradient is always zero, count as neither). A reentrant checkpoint hides
    its segment: ``inside(node)`` gives the leaves it uses, or ``None`` where they are not known, and the segment is
    then taken to reach a leaf outside ``shared`` (its inside left unweighted rather than weighted wrongly)."""

    def kinds(leaves: Sequence[Tensor]) -> tuple[bool, bool]:
        own = [leaf for leaf in leaves if not is_tap_anchor(leaf)]
        return any(id(leaf) in shared for leaf in own), any(id(leaf) not in shared for leaf in own)

    reach: dict[Any, tuple[bool, bool]] = {}  # node -> (reaches a shared leaf, reaches another leaf)
    stack: list[tuple[Any, bool]] = [(root, False) for root in roots]
    while stack:
        node, children_done = stack.pop()
        if node in reach:
            continue
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if child not in reach)
            continue
        variable = getattr(node, "variable", None)
        some, other = False, False
        if variable is not None and not is_tap_anchor(variable):
            some, other = id(variable) in shared, id(variable) not in shared
        if type(node).__name__ == CHECKPOINT_NODE:
            leaves = inside(node)
            segment_some, segment_other = (False, True) if leaves is None else kinds(leaves)
            some, other = some or segment_some, other or segment_other
        for child in _children(node):
            child_some, child_other = reach[child]
            some, other = some or child_some, other or child_other
        reach[node] = (some, other)
    return {node for node, (some, other) in reach.items() if some and not other}


def _scaler(edges: list[int], scale: float) -> Callable[[tuple[Any, ...], tuple[Any, ...]], tuple[Any, ...]]:
    """A node hook scaling the gradients its node sends along ``edges`` (indices into ``next_functions``)."""

    def hook(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(g * scale if k in edges and g is not None else g for k, g in enumerate(grad_inputs))

    return hook


def weighted_backward(
    batch: TaskLosses,
    scales: Sequence[float],
    run: Callable[[Tensor], None],
    shared: set[int] | None = None,
    segment_leaves: Callable[[Any], Sequence[Tensor]] | None = None,
) -> list[Tensor]:
    """Run ``run(total)`` (e.g. ``total.backward()``) on ``total = sum_i w_i L_i`` with task ``i``'s gradient
    multiplied by ``scales[i]`` wherever it enters the weighted part of the graph: the nodes that another task also
    reaches and, with ``shared`` (the ids of the shared parameters, or of the tensors the graph holds for them),
    the nodes that reach shared parameters only.

    A reentrant checkpoint segment that runs a module uses that module's parameters; one that runs any other
    function is looked into by ``segment_leaves`` (a node -> its leaves, e.g.
    :func:`~gradconflict.measure.checkpoint.segment_leaves`, which recomputes it) where one task alone reaches it,
    and is otherwise left out of the weighted part.

    Each loss first passes through its own view, so that a task always owns at least one node (two tasks may
    share a loss tensor). Returns the leaves (parameters) in the weighted part, for the caller to check that they
    are the ones it meant to weight.
    """
    views = [loss.view_as(loss) for loss in batch.losses]
    total = TaskLosses(batch.names, views, batch.weights).total()
    roots = [view.grad_fn for view in views]
    owner = owners(roots)
    weighted = {node for node, task in owner.items() if task == COMMON}

    def inside(node: Any) -> Sequence[Tensor] | None:
        module = segment_module(node)
        if module is not None:
            return [p for p in module.parameters() if p.requires_grad]
        # a segment two tasks reach is in the weighted part already: only one task's own is worth recomputing
        return None if segment_leaves is None or owner[node] == COMMON else segment_leaves(node)

    # each task's view stays its own, so that the edge leaving it is the one that gets weighted
    if shared is not None:
        weighted |= _only_shared(roots, shared, inside) - set(roots)
    handles = []
    try:
        for node, task in owner.items():
            if node in weighted:
                continue
            edges = [k for k, (child, _) in enumerate(node.next_functions) if child in weighted]
            if edges:
                handles.append(node.register_hook(_scaler(edges, float(scales[task]))))
        run(total)
    finally:
        for handle in handles:
            handle.remove()
    leaves = (getattr(node, "variable", None) for node in owner if node in weighted)
    return [leaf for leaf in leaves if leaf is not None]
