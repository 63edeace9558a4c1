"""Gradient accumulation: a logical step made of ``accumulation_steps`` micro-batches, each written to ``.grad``
as it comes, and measured as a whole: the Gram of the per-task gradients summed over the group. A measured group
holds one copy of every shared parameter per task while it accumulates.

A group attributed to its examples (``sample_ids`` on each micro-batch) also holds, for every rule-covered layer
of every micro-batch, the layer's input and each task's output gradient: an example's contribution
``<g_i^(n), g_j>`` is taken against the group's ``g_j``, which is known only once the last micro-batch has run."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from gradconflict.measure.attribution import HeldLayer, SampleAttribution
from gradconflict.measure.engine import MeasurementRefused, Plan, TappedEngine
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
    # whether the group's micro-batches carry sample_ids (its first one says), with their tasks (the order of the
    # held T axes); untapped: they do, but the group's forwards ran untapped, so it cannot be attributed
    attributed: bool | None = None
    tasks: tuple[str, ...] = ()
    untapped: bool = False
    # each attributed micro-batch's ids and held layers
    held: list[tuple[Tensor, list[HeldLayer]]] = field(default_factory=list)

    def release(self) -> None:
        """Drop the held layers' inputs and output gradients."""
        for _, layers in self.held:
            for layer in layers:
                layer.release()
        self.held = []


class MicroBatches:
    """The open group of micro-batches of one monitor (``size``: ``accumulation_steps``)."""

    def __init__(self, size: int, measuring: MeasuringPass) -> None:
        self.size = size
        self.measuring = measuring
        self.count = 0  # micro-batches in the open group
        self._group: _Group | None = None
        # whether the last measured group carried sample_ids (None: no group measured yet); the monitor taps a
        # measured group's micro-batches unless it is False (untapped, they cost less)
        self.attributed: bool | None = None

    def reset(self) -> None:
        """Drop the open group."""
        if self._group is not None:
            self._group.release()
        self.count, self._group, self.attributed = 0, None, None

    def add(
        self, batch: TaskLosses, step: int, measured: bool, write: Callable[[], object], ids: Tensor | None = None,
        tapped: bool = True,
    ) -> bool:
        """Add one micro-batch (its per-task gradients when the group is ``measured``, attributed to its examples
        ``ids`` when given), then write its ``.grad`` (unless it is non-finite and skipped); returns whether the
        group is now full. A group is attributed on every micro-batch or on none (else ``ValueError``, before
        anything is computed or written). ``tapped``: whether this micro-batch's forward was tapped; a group whose
        first micro-batch carries ids but was not is measured without attribution (warned)."""
        if measured:
            group = self._group = self._group or _Group()
            self._check_ids(group, batch, ids)
            if group.attributed is None:  # the group's first micro-batch
                group.attributed, group.tasks = ids is not None, tuple(batch.names)
                group.untapped = ids is not None and not tapped
                if group.untapped:
                    warnings.warn(
                        "gradconflict: sample_ids came with an accumulation group whose forwards ran untapped (the "
                        "measured group before it had none, and untapped micro-batches cost less): this group is "
                        "measured without attribution (report.samples is None); the next measured groups are "
                        "tapped, and attributed while they pass sample_ids",
                        UserWarning,
                        stacklevel=4,
                    )
            if self._accumulate(batch, step, group, None if group.untapped else ids):
                write()
        else:
            write()
        self.count += 1
        return self.count >= self.size

    def _check_ids(self, group: _Group, batch: TaskLosses, ids: Tensor | None) -> None:
        if group.attributed is None:
            return
        if (ids is not None) != group.attributed:
            given, missing = ("this", "earlier") if ids is not None else ("earlier", "this")
            raise ValueError(
                f"sample_ids was passed on {given} micro-batch(es) of the accumulation group but not on {missing} "
                "one(s): a group is attributed as a whole, so pass sample_ids on every micro-batch of a group or on "
                "none (this micro-batch was neither measured nor written)"
            )
        if group.attributed and tuple(batch.names) != group.tasks:
            raise ValueError(
                f"an accumulation group attributed with sample_ids needs the same tasks, in the same order, on every "
                f"micro-batch: {list(group.tasks)} before, {list(batch.names)} now (this micro-batch was neither "
                "measured nor written)"
            )

    def close(self, step: int) -> ConflictReport | None:
        """End the open group: its report (``None`` when it was not measured)."""
        group, self._group, self.count = self._group, None, 0
        if group is None:
            return None
        self.attributed = group.attributed
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
            group.release()
            return assembler.record(assembler.skipped(names, step, reason or "nothing measured", losses, weights))
        total = Accumulator(len(names), plan, losses.device, self.measuring.reduction(step))
        names_of = self.measuring.planner.shared.names

        def position(k: int) -> tuple[int, str, str]:  # the model's order, not the one each rank's backward met
            layer = plan.layer_of.get(k, "")
            return plan.layer_rank.get(layer, -1), layer, names_of.get(k, "")

        per_task = {}
        for k in sorted(leaves, key=position):
            leaf = leaves[k]
            rows = [group.grads.get(n, {}).get(k) for n in names]
            zero = next(r[1] for r in rows if r is not None).new_zeros(leaf.shape)
            per_task[k] = (leaf, torch.stack([zero if r is None else r[1] for r in rows]))
        samples = self._attribute(group, per_task, plan, names)
        if isinstance(samples, str):
            return assembler.record(assembler.skipped(names, step, samples, losses, weights))
        for leaf, grads in per_task.values():
            total.add_per_task(leaf, grads)
        measurement = in_dtype(total.result("accumulated"), self.measuring.planner.report_dtype)
        report = assembler.measured(names, measurement, weights, losses, step)
        report.samples = samples
        return assembler.record(report)

    def _attribute(
        self, group: _Group, per_task: dict[int, tuple[Tensor, Tensor]], plan: Plan, names: tuple[str, ...]
    ) -> SampleAttribution | str | None:
        """The group's attribution to its examples (``None`` when not attributed), or why it failed."""
        if not group.held:
            return None
        measuring = self.measuring
        engine = cast(TappedEngine, measuring.engine)  # the monitor checked it
        totals = measuring.scaling.scale_gradients(per_task)  # in the held output gradients' units
        ids = torch.cat([i for i, _ in group.held])
        parts = [(len(i), layers) for i, layers in group.held]
        attribution = measuring.attempt(lambda: engine.attribute_held(parts, totals, plan))
        group.release()
        if isinstance(attribution, str):
            return attribution
        return measuring.scaling.unscale_samples(attribution.result(ids, names))

    def _accumulate(self, batch: TaskLosses, step: int, group: _Group, ids: Tensor | None) -> bool:
        """Add one micro-batch's per-task gradients to ``group`` (and hold its layers for the attribution to
        ``ids``); returns whether to write its ``.grad``."""
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
        outcome: dict[int, tuple[Tensor, Tensor]] | str
        if ids is None:
            outcome = measuring.attempt(lambda: measuring.engine.gradients(measuring.scaling.roots(batch), plan))
        else:
            engine = cast(TappedEngine, measuring.engine)  # the monitor checked it
            try:
                held = measuring.attempt(lambda: engine.hold(measuring.scaling.roots(batch), plan, len(ids)))
            except MeasurementRefused as err:  # the user's to fix; the group is recorded as skipped
                group.skip = f"sample_ids refused: {err}"
                group.release()
                raise
            if isinstance(held, str):
                outcome = held
            else:
                outcome = held[0]
                group.held.append((ids, held[1]))
        if isinstance(outcome, str):
            group.skip = outcome
            group.release()
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
