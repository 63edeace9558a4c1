"""Capture: forward hooks that tap each rule-covered module's output, and walks of the autograd graph.

A tap is an identity autograd node inserted after a module's output by a forward hook (no edit of the model).
During the engine's batched backward, the tap unwraps the module's vmapped output gradient into the plain
``[T, ...]`` tensor of all T tasks' gradients and hands it to the engine's current pass; outside that pass the
tap passes gradients through untouched. Every tap also feeds a
scalar *anchor*; asking autograd for the anchor's gradient makes the backward visit every tapped layer while
computing no weight gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch._C import _functorch as functorch

from gradconflict.rules import Call, LayerRule, rule_for

__all__ = ["Capture", "Graph", "OutputCapture", "walk_graph"]


class Receiver(Protocol):
    """What the engine's pass offers the taps."""

    num_tasks: int

    def receive(self, call: Call, grads: Tensor) -> None: ...


def _task_batch(grad: Tensor, num_tasks: int) -> Tensor:
    """The plain ``[T, ...]`` tensor behind the vmapped gradient a tap sees during the batched backward.

    Inside ``torch.func.vmap`` the gradient is a BatchedTensor: one tensor holding every task's gradient along a
    batch dimension. Unwrapping it directly (functorch's own accessors) costs nothing, where routing it through
    an ``autograd.Function`` with a ``vmap`` rule costs about 0.4 ms of Python per layer. A gradient that does not
    depend on the task (not batched) is the same for every task.
    """
    if functorch.is_batchedtensor(grad):
        return functorch.get_unwrapped(grad).movedim(functorch.maybe_get_bdim(grad), 0)
    return grad.expand(num_tasks, *grad.shape)


class _Tap(torch.autograd.Function):
    """Identity on a module's output that reports the output's gradient to the active pass, if any."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, call: Call, capture: Capture) -> Tensor:
        ctx.gc_call = call
        ctx.gc_capture = capture
        # A detached alias, not a view: users may modify the output in place (ReLU(inplace=True)).
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        receiver = ctx.gc_capture.receiver
        if receiver is None:
            return grad, None, None, None
        receiver.receive(ctx.gc_call, _task_batch(grad, receiver.num_tasks))
        return grad, grad.new_zeros(()), None, None


class Capture:
    """Forward hooks on every module of ``model`` that a layer rule covers.

    ``enabled`` decides whether forwards are tapped (the monitor turns it off for steps it will not measure);
    ``modules``, once set by :meth:`restrict`, limits tapping to those modules;
    ``receiver`` is the engine pass that taps report to during its batched backward.
    """

    def __init__(self, model: nn.Module) -> None:
        self.enabled = True
        self.modules: set[nn.Module] | None = None
        self.receiver: Receiver | None = None
        self._anchors: dict[torch.device, Tensor] = {}
        self._handles = []
        self._tapped: list[nn.Module] = []
        for module in model.modules():
            rule = rule_for(module)
            if rule is not None and rule.params(module):
                self._tapped.append(module)
                self._handles.append(module.register_forward_hook(self._make_hook(rule)))

    def _make_hook(self, rule: LayerRule) -> Any:
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
            capture = ref()
            if (
                capture is None
                or not capture.enabled
                or (capture.modules is not None and module not in capture.modules)
                or not torch.is_grad_enabled()
                or not isinstance(output, Tensor)
                or not output.requires_grad
            ):
                return None
            call = Call(module, rule, rule.save(module, args, output), owner=capture)
            return _Tap.apply(output, capture.anchor(output.device), call, capture)

        return hook

    def restrict(self, shared: set[int], min_head_params: int) -> None:
        """Tap only the modules that hold a shared parameter, and heads of at least ``min_head_params``
        parameters: a small head's T materialised gradients cost less than a tap's fixed overhead."""
        self.modules = set()
        for module in self._tapped:
            params = rule_for(module).params(module).values()  # type: ignore[union-attr]
            if any(id(p) in shared for p in params) or sum(p.numel() for p in params) >= min_head_params:
                self.modules.add(module)

    def anchor(self, device: torch.device) -> Tensor:
        """The scalar leaf every tap on ``device`` feeds (its gradient is always zero)."""
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def is_anchor(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is one of this capture's anchors."""
        return any(tensor is a for a in self._anchors.values())

    def close(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


class OutputCapture:
    """Keeps the latest output of one module (the shared representation, for ``engine="representation"``)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.name = name
        self.output: Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            self.output = output

    def close(self) -> None:
        """Remove the hook and drop the kept output."""
        self._handle.remove()
        self.output = None


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

    ``leaves``: every leaf tensor that requires grad, in discovery order; ``calls``: the tapped module calls;
    ``uses``: for each leaf (by id), how many places consume it (see :func:`walk_graph`).
    """

    leaves: list[Tensor] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    uses: dict[int, int] = field(default_factory=dict)


def walk_graph(roots: Sequence[Tensor]) -> Graph:
    """Walk the autograd graph below ``roots`` once.

    A leaf's *uses* count the operations that consume it, looking through alias nodes (transpose, view,
    dtype cast), so that a Linear weight used by one call counts 1 and a weight tied into two places counts 2
    even when autocast casts it once for both.

    >>> w = torch.ones(2, requires_grad=True)
    >>> g = walk_graph([(w * 2).sum() + (w * 3).sum()])
    >>> g.uses[id(w)]
    2
    """
    graph = Graph()
    accumulators = []
    parents: dict[Any, list[Any]] = {}  # node -> the nodes that feed it, one entry per edge
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        call = getattr(node, "gc_call", None)
        if call is not None:
            graph.calls.append(call)
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


def leaves_of(root: Tensor) -> list[Tensor]:
    """The leaf tensors requiring grad that ``root`` depends on."""
    return walk_graph([root]).leaves


def depends_on(root: Tensor, targets: Iterable[Tensor]) -> bool:
    """Whether ``root``'s graph reaches any of ``targets`` (leaves), stopping at the first one found."""
    wanted = {id(t) for t in targets}
    stack = [root.grad_fn] if root.grad_fn is not None else []
    seen = set(stack)
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in wanted:
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False
