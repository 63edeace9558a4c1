"""This step's plan: which parameters are measured, and which layer owns each.

The shared set is read at every measured step (a module's parameters that require grad, or the discovered
ones), so parameters added, removed, frozen or unfrozen mid-run are followed (a LoRA adapter put into a
monitored model, or merged away); whenever the set changes, the layer names are read again and the engine is
told.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from gradconflict.measure.engine import Engine, Plan
from gradconflict.measure.shared import SharedParameters, gram_dtype, layer_names
from gradconflict.measure.tasks import TaskLosses
from gradconflict.monitor._scaling import Scaling

__all__ = ["DetachedTaskWarning", "Planner"]

WAITING = "the shared parameters are found at the first step that carries two or more tasks"
FROZEN = "no shared parameter requires grad (is the backbone frozen?)"


class DetachedTaskWarning(UserWarning):
    """A task's loss stopped reaching the shared parameters after earlier steps in which it did (a
    ``.detach()`` on the way): it is measured as a task with a zero gradient there. Raised once per task.

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", DetachedTaskWarning)  # stop the run instead of warning
    ...     issubclass(DetachedTaskWarning, UserWarning)
    True
    """


class Planner:
    """Makes each measured step's :class:`~gradconflict.measure.engine.Plan` for ``engine`` on ``model``."""

    def __init__(self, model: nn.Module, shared: SharedParameters, engine: Engine, scaling: Scaling) -> None:
        self.model = model
        self.shared = shared
        self.engine = engine
        self.scaling = scaling
        self.plan: Plan | None = None
        self._params: list[nn.Parameter] = []  # the last plan's shared parameters
        self.report_dtype = torch.float32  # the reports' Gram dtype: the shared parameters' own
        self._layer_of, self._module_name = layer_names(model)
        self._detached: set[str] = set()

    def reset(self) -> None:
        """Forget the plan (a resumed run makes it again)."""
        self.plan = None

    def plan_for(self, batch: TaskLosses) -> Plan | str:
        """This step's plan, or why it cannot be measured. Raises ``ValueError`` naming a task whose loss
        never reached the shared parameters (checked at each task's first step)."""
        shared = self.shared.resolve(batch.names, batch.losses)
        if shared is None:
            return WAITING
        if not shared:
            return FROZEN
        copies = self.shared.leaves(shared)  # FSDP2: the graph holds unsharded copies of the parameters
        ids = {id(p) for p in shared} | {id(c) for c in copies.values()}
        if self.plan is None or self.plan.shared != ids:
            if self.plan is not None:  # modules may have been added, removed or moved since
                self._layer_of, self._module_name = layer_names(self.model)
            layer_of = self._layer_of | {id(c): self._layer_of[k] for k, c in copies.items() if k in self._layer_of}
            self.report_dtype = gram_dtype(shared)
            self.plan = Plan(ids, layer_of, self._module_name, self.scaling.gram_dtype(shared), copies)
            self.engine.restrict(ids)
        self.shared.check_dependence(batch.names, batch.losses, shared)
        self._params = shared
        return self.plan

    def warn_detached(self, batch: TaskLosses, zero: list[str], step: int) -> None:
        """Warn, once per task, when a task whose gradient on the shared parameters is exactly zero this step
        no longer reaches them at all (a graph walk, on such steps only)."""
        new = [n for n in zero if n not in self._detached]
        if not new or self.plan is None:
            return
        losses = dict(zip(batch.names, batch.losses))
        for name in new:
            if not self.shared.reaches(losses[name], self._params):
                self._detached.add(name)
                warnings.warn(
                    f"gradconflict: loss {name!r} no longer depends on any shared parameter at step {step} (detached "
                    "from the backbone?): it is measured as a task with a zero gradient. Check the forward that "
                    "computes it",
                    DetachedTaskWarning,
                    stacklevel=4,
                )
