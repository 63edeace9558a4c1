"""Gradient accumulation: a logical step made of ``accumulation_steps`` micro-batches, each written to ``.grad``
as it comes, and measured as a whole: the Gram of the per-task gradients summed over the group. A measured group
holds one copy of every shared parameter per task while it accumulates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from gradconflict.measure.engine import Plan
from gradconflict.measure.engine.base import Accumulator
from gradconflict.measure.report import ConflictReport
from gradconflict.measure.tasks import TaskLosses
from gradconflict.monitor._measuring import MeasuringPass
from gradconflict.monitor._scaling import in_dtype

__all__ = ["MicroBatches"]


@dataclass
class _Group:
    """The per-task gradients of the current logical step, summed over its micro-batches, keyed by task name."""

    grads: dict[str, dict[int, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    plan: Plan | None = None
    skip: str = ""


class MicroBatches:
    """The open group of micro-batches of one monitor (``size``: ``accumulation_steps``)."""

    def __init__(self, size: int, measuring: MeasuringPass) -> None:
        self.size = size
        self.measuring = measuring
        self.count = 0  # micro-batches in the open group
        self._group: _Group | None = None

    def reset(self) -> None:
        """Drop the open group."""
        self.count, self._group = 0, None

    def add(self, batch: TaskLosses, step: int, measured: bool, write: Callable[[], object]) -> bool:
        """Add one micro-batch (its per-task gradients when the group is ``measured``), then write its ``.grad``
        (unless it is non-finite and skipped); returns whether the group is now full."""
        if measured:
            if self._group is None:
                self._group = _Group()
            if self._accumulate(batch, step, self._group):
                write()
        else:
            write()
        self.count += 1
        return self.count >= self.size

    def close(self, step: int) -> ConflictReport | None:
        """End the open group: its report (``None`` when it was not measured)."""
        group, self._group, self.count = self._group, None, 0
        if group is None:
            return None
        assembler = self.measuring.assembler
        names = tuple(group.losses)
        losses = torch.stack([group.losses[n] for n in names])
        weights = torch.stack([group.weights[n] for n in names])
        leaves: dict[int, Tensor] = {}
        for sums in group.grads.values():
            leaves.update((k, leaf) for k, (leaf, _) in sums.items())
        plan = group.plan
        reason = group.skip or (None if plan is not None else "nothing measured")
        sync = self.measuring.sync
        if sync is not None and sync.is_global:  # the ranks reduce the same layers, or none does
            layers = set() if plan is None or reason else {plan.layer_of.get(k, "") for k in leaves}
            reason = self.measuring.compare(0, reason or cast(Plan, plan), layers, losses.device)[1] or reason
        if reason or plan is None:
            return assembler.record(assembler.skipped(names, step, reason or "nothing measured", losses, weights))
        total = Accumulator(len(names), plan, losses.device, self.measuring.reduction(step))
        names_of = self.measuring.planner.shared.names

        def position(k: int) -> tuple[int, str, str]:  # the model's order, not the one each rank's backward met
            layer = plan.layer_of.get(k, "")
            return plan.layer_rank.get(layer, -1), layer, names_of.get(k, "")

        for k in sorted(leaves, key=position):
            leaf = leaves[k]
            rows = [group.grads.get(n, {}).get(k) for n in names]
            zero = next(r[1] for r in rows if r is not None).new_zeros(leaf.shape)
            total.add_per_task(leaf, torch.stack([zero if r is None else r[1] for r in rows]))
        measurement = in_dtype(total.result("accumulated"), self.measuring.planner.report_dtype)
        return assembler.record(assembler.measured(names, measurement, weights, losses, step))

    def _accumulate(self, batch: TaskLosses, step: int, group: _Group) -> bool:
        """Add one micro-batch's per-task gradients to ``group``; returns whether to write its ``.grad``."""
        weights = batch.weight_vector()
        for t, (name, loss) in enumerate(zip(batch.names, batch.loss_vector())):
            group.losses[name] = group.losses[name] + loss if name in group.losses else loss
            group.weights[name] = weights[t].to(loss.device)
        if group.skip:
            return True
        measuring = self.measuring
        plan = measuring.plan(batch)
        if isinstance(plan, str):
            group.skip = plan
            return True
        group.plan = plan
        outcome = measuring.attempt(lambda: measuring.engine.gradients(measuring.scaling.roots(batch), plan))
        if isinstance(outcome, str):
            group.skip = outcome
            return True
        grads = measuring.scaling.unscale_gradients(outcome)
        norms = sum(g.flatten(1).pow(2).sum(1) for _, g in grads.values()) if grads else None
        verdict = measuring.guard.check(batch, norms, step, True)  # type: ignore[arg-type]
        group.skip = verdict.skip
        if verdict.zero:
            measuring.planner.warn_detached(batch, verdict.zero, step)
        for t, name in enumerate(batch.names):
            sums = group.grads.setdefault(name, {})
            for k, (leaf, g) in grads.items():
                sums[k] = (leaf, sums[k][1] + g[t] if k in sums else g[t])
        return verdict.write
