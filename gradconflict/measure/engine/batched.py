"""The batched pass of the default engine: one vectorised backward over the T tasks, whose receiver covers each
tapped module by its layer rule as the module's ``[T, ...]`` output gradients arrive, and collects the per-task
gradients of the shared parameters that no rule covers (:class:`BatchedPass`). The engine that runs it, times it
against the per-task loop and falls back is :mod:`gradconflict.measure.engine.tapped`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gradconflict.measure.attribution import Attributor, HeldLayer
from gradconflict.measure.capture import Capture, task_batch
from gradconflict.measure.engine.base import Accumulator, Plan
from gradconflict.measure.graph import Graph
from gradconflict.measure.rules import Call
from gradconflict.measure.rules.base import task_blocks, task_rows

if TYPE_CHECKING:
    from gradconflict.measure.distributed import Reduction

__all__ = ["BatchedPass", "Inexact", "TaskByTask"]


class Inexact(Exception):
    """A module's calls were split over several recomputed segments: a rule cannot take them one at a time."""


class BatchedPass(Accumulator):
    """One batched backward: covers each tapped module by its rule, receives the taps' output gradients and
    collects the materialised parameters' per-task gradients."""

    def __init__(
        self,
        num_tasks: int,
        plan: Plan,
        capture: Capture,
        device: torch.device,
        cover: bool,
        reduction: Reduction | None = None,
        attribution: Attributor | None = None,
        held: list[HeldLayer] | None = None,
    ) -> None:
        super().__init__(num_tasks, plan, device, reduction)
        self.capture = capture
        self.cover = cover
        self.attribution = attribution
        # a micro-batch of an attributed accumulation group: each covered module's calls held for the group's end
        # (see Attributor.group), and every shared parameter's per-task gradients materialised by the backward
        self.held = held
        self._pending: dict[nn.Module, tuple[list[Call], set[str]]] = {}
        self._arrived: Counter[nn.Module] = Counter()
        self._seen: set[int] = set()  # parameters met in an earlier part of this pass
        self._parts: list[list[nn.Module]] = []  # modules covered by each open part (outer graph, segments)
        self.calls: list[Call] = []

    # -- parts: the outer graph, then each recomputed checkpoint segment ------------------------------------
    def begin(self, graph: Graph, exclude: set[int]) -> list[Tensor]:
        """Cover this part's modules by their rules; returns the anchors and the materialised shared leaves."""
        shared = self.plan.shared
        calls: dict[nn.Module, list[Call]] = {}
        for call in graph.calls:
            if call.owner is self.capture:  # another monitor's taps on the same model are not ours
                self.calls.append(call)
                if call.saved is not None and self.cover:  # not consumed by an earlier measurement of this graph
                    calls.setdefault(call.module, []).append(call)
        leaf = self.plan.leaf
        claims = Counter(id(leaf(p)) for m, c in calls.items() for p in c[0].rule.params(m).values())
        covered: set[int] = set()
        part: list[nn.Module] = []
        for module, module_calls in calls.items():
            # A rule covers a parameter only when every use of it is one of this module's calls (tying and direct
            # use go to the materialised route), when every call ran with it (not with a tensor substituted by
            # torch.func.functional_call), and when no tensor hook changes its gradient.
            covers = {
                name: leaf(p)
                for name, p in module_calls[0].rule.params(module).items()
                if id(leaf(p)) in shared
                and claims[id(leaf(p))] == 1
                and graph.uses.get(id(leaf(p)), 0) == len(module_calls)
                and all(c.used.get(name) == id(leaf(p)) for c in module_calls)
                and not leaf(p)._backward_hooks
            }
            names = set(covers)
            if names:
                ids = {id(t) for t in covers.values()}
                if module in self._pending or ids & self._seen:
                    raise Inexact(self.plan.module_name.get(module, type(module).__name__))
                self._pending[module] = (module_calls, names)
                part.append(module)
                covered |= ids
        anchors = [t for t in graph.leaves if self.capture.is_anchor(t)]
        materialised = covered if self.held is None else set()  # held: the backward's own kernels, not the rules
        generic = [t for t in graph.leaves if id(t) in shared and id(t) not in materialised and id(t) not in exclude]
        if {id(t) for t in generic} & self._seen:
            raise Inexact("a parameter used in several checkpointed segments")
        self._seen |= covered | {id(t) for t in generic}
        self._parts.append(part)
        return anchors + generic

    def end(self, requested: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """A recomputed segment's gradients, seen inside the batched backward (vmapped)."""
        self.finish(requested, [task_batch(g, self.num_tasks) for g in grads])

    def finish(self, requested: Sequence[Tensor], per_task: Sequence[Tensor]) -> None:
        """Add the materialised ``[T, ...]`` gradients (the anchors' are zero) and run the waiting rules."""
        for leaf, g in zip(requested, per_task):
            if not self.capture.is_anchor(leaf):
                self.add_per_task(leaf, g)
        for module in self._parts.pop():
            if module in self._pending:  # a module whose calls did not all reach the backward
                self._compute(module)

    # -- taps ----------------------------------------------------------------------------------------------
    def receive(self, call: Call, grads: Tensor) -> None:
        """A tap's ``[T, ...]`` output gradients; the module's rule runs once all its calls have arrived."""
        module = call.module
        if module not in self._pending or call.saved is None:
            return
        call.grads = grads
        self._arrived[module] += 1
        if self._arrived[module] == len(self._pending[module][0]):
            self._compute(module)

    def _compute(self, module: nn.Module) -> None:
        module_calls, names = self._pending.pop(module)
        calls = [c for c in module_calls if c.grads is not None]
        if calls:
            rule, layer, dtype = calls[0].rule, self.plan.module_name[module], self.plan.gram_dtype
            if self.held is not None:
                self.held.append(HeldLayer(layer, module, rule, calls, names, dtype))
                return  # the calls stay whole
            params = rule.params(module)
            num_params = sum(self.plan.leaf(params[n]).numel() for n in names)
            if self.reduction is not None:  # across processes: the per-task gradients themselves are reduced
                per_task = rule.per_task(module, calls, names, dtype)
                total = self.add_rows(layer, task_rows(per_task, dtype), num_params, "materialised")
                if self.attribution is not None and total is not None:  # each example against the global g_j
                    self.attribution.against(layer, module, rule, calls, names, dtype, task_blocks(total, per_task))
            elif self.attribution is not None:
                out = self.attribution.layer(layer, module, rule, calls, names, dtype)
                self.add_gram(layer, out.gram, num_params, out.route)
            else:
                out = rule.gram(module, calls, names, dtype)
                self.add_gram(layer, out.gram, num_params, out.route)
        for c in module_calls:
            c.release()  # free the recorded input and the [T, ...] output gradients as soon as the layer is done

    def release(self) -> None:
        """Drop what every tap of this step recorded, measured or not (except the calls :attr:`held`)."""
        kept = {id(call) for layer in self.held or [] for call in layer.calls}
        for call in self.calls:
            if id(call) not in kept:
                call.release()
        self._pending.clear()


class TaskByTask:
    """The taps' receiver on a per-task loop: each task's backward reports every tapped call's output gradient
    (``[1, ...]``, outside ``vmap``), copied at once into the call's ``[T, ...]`` block; :meth:`deliver` hands the
    pass each call's block once every task has run (zeros for a task that did not reach the call), and the pass
    runs the layer rules on them as the batched backward would have."""

    num_tasks = 1

    def __init__(self, current: BatchedPass) -> None:
        self.current = current
        self.task = 0
        self._grads: dict[Call, tuple[Tensor, set[int]]] = {}

    def receive(self, call: Call, grads: Tensor) -> None:
        """One task's output gradient of ``call``."""
        if call not in self._grads:
            self._grads[call] = (grads.new_empty((self.current.num_tasks, *grads.shape[1:])), set())
        block, reached = self._grads[call]
        block[self.task] = grads[0]
        reached.add(self.task)

    def deliver(self) -> None:
        """Every call's ``[T, ...]`` output gradients to the pass (whose rules run as their modules complete)."""
        grads, self._grads = self._grads, {}
        for call, (block, reached) in grads.items():
            for task in set(range(len(block))) - reached:
                block[task] = 0
            self.current.receive(call, block)
