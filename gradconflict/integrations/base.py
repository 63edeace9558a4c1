"""What every framework integration does with the monitor, whatever the framework.

A framework owns the training loop: it calls the model's training step, then its own backward (which scales the
loss for mixed precision and divides it for gradient accumulation), then the optimizer. The integration hooks
into three points of that loop, each through :class:`FrameworkMonitor`:

1. when training starts, :meth:`FrameworkMonitor.start` attaches a :class:`~gradconflict.ConflictMonitor` with the
   framework's accumulation, loss scaler and step count;
2. at each backward, :meth:`FrameworkMonitor.backward` reads the task losses from what the training step returned
   and measures them, handing the framework's own backward to the monitor to write ``.grad``;
3. when the optimizer steps, :meth:`FrameworkMonitor.end_group` closes a short group of micro-batches.

>>> import torch, torch.nn as nn
>>> model = nn.ModuleDict({"backbone": nn.Linear(2, 4), "heads": nn.ModuleDict(
...     {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})})
>>> hooked = FrameworkMonitor(shared="backbone", every=1)
>>> hooked.start(model, accumulation_steps=1, scaler=None, start_step=1, log_every=50)
>>> h = model.backbone(torch.randn(8, 2))
>>> losses = {t: model.heads[t](h).pow(2).mean() for t in "ab"}
>>> hooked.backward({"loss": sum(losses.values()), "task_losses": losses}, lambda: sum(losses.values()).backward())
>>> scalars = hooked.take_scalars()
>>> sorted(scalars)[:3], hooked.monitor.history[-1].step, hooked.take_scalars()
(['conflict/alignment/a', 'conflict/alignment/b', 'conflict/cancellation'], 1, {})
>>> hooked.close()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from gradconflict.integrations.scalars import report_scalars
from gradconflict.measure.report import ConflictReport
from gradconflict.monitor import ConflictMonitor, MeasurementWarning

__all__ = ["FrameworkMonitor"]


def _field(output: Any, key: str) -> Any:
    """``output[key]`` for a mapping (a dict, a ``ModelOutput``), ``output.key`` for an object, else ``None``."""
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None)


@dataclass
class FrameworkMonitor:
    """A :class:`~gradconflict.ConflictMonitor` driven by a training framework's loop.

    Args:
        shared: the shared part: a module path in the model (``"backbone"``), a module, or ``None`` to discover the
            shared parameters (see :class:`~gradconflict.ConflictMonitor`).
        every: measure every ``every``-th optimizer step; ``None``: the steps the framework logs (its logging
            interval), so that every logged step carries a fresh measurement and the others cost nothing.
        task_losses_key: the field of the training step's output that holds ``{task: loss}``.
        task_weights_key: the field holding ``{task: weight}`` (optional; weights default to 1).
        sample_ids_key: the field holding the batch's example ids (optional: dataset indices, one per example),
            which attributes each measured step's Gram to its examples (``sample_ids=`` of
            :meth:`~gradconflict.ConflictMonitor.backward`; with gradient accumulation, on every micro-batch).
        layers: also log each shared layer's worst cosine (one key per shared layer: off by default, since a
            framework prints every logged key to the console; the monitor's history keeps the layers either way).
        monitor_options: more :class:`~gradconflict.ConflictMonitor` arguments (``threshold``, ``engine``,
            ``sinks``, ``max_history``, ...). ``on_nonfinite`` defaults to ``"propagate"``: a NaN loss reaches
            ``.grad`` as the framework's own loop would have it, and the framework's own tools (a loss scaler's
            skipped step, anomaly detection) deal with it.

    Attributes:
        monitor: the monitor of the current (or last) run, ``None`` before training starts. It stays readable
            after training: ``monitor.history``, ``monitor.advise()``.
    """

    shared: str | nn.Module | None = None
    every: int | None = None
    task_losses_key: str = "task_losses"
    task_weights_key: str = "task_weights"
    sample_ids_key: str = "sample_ids"
    layers: bool = False
    monitor_options: Mapping[str, Any] | None = None
    monitor: ConflictMonitor | None = field(default=None, init=False)
    _report: ConflictReport | None = field(default=None, init=False, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        every = self.every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(
                f"every must be a positive integer or None (the framework's logging interval), got {every!r}"
            )
        taken = sorted({"model", "shared", "every", "accumulation_steps", "scaler", "start_step"}
                       & set(self.monitor_options or {}))
        if taken:
            raise ValueError(f"monitor_options may not set {taken}: the integration sets them from the framework")

    @classmethod
    def options_from(cls, kwargs: dict[str, Any]) -> FrameworkMonitor:
        """A :class:`FrameworkMonitor` from the keyword arguments that name its fields, removed from ``kwargs``
        (the rest are the framework's)."""
        names = [f.name for f in fields(cls) if f.init]
        return cls(**{name: kwargs.pop(name) for name in names if name in kwargs})

    @property
    def running(self) -> bool:
        """Whether a monitor is attached and open."""
        return self.monitor is not None and not self.monitor.closed

    def start(
        self, model: nn.Module, *, accumulation_steps: int, scaler: Any, start_step: int, log_every: int | None
    ) -> None:
        """Attach a new monitor to ``model`` with the framework's settings (closing any previous one).

        ``start_step`` is the framework's count of optimizer steps once the coming step is done, so that with
        ``every=k`` the steps measured are those whose count is a multiple of k: the steps a framework logging
        every k steps logs. ``log_every`` is the framework's logging interval, used when ``every`` is ``None``.
        """
        every = self.every or log_every
        if not every or every < 1:
            raise ValueError(
                f"the framework logs no step (logging interval {log_every!r}), so there is no step to measure by "
                "default: pass every= (measure every k-th optimizer step)"
            )
        self.close()
        shared = model.get_submodule(self.shared) if isinstance(self.shared, str) else self.shared
        options = {"on_nonfinite": "propagate", **(self.monitor_options or {})}
        self.monitor = ConflictMonitor(
            model, shared, every=every, accumulation_steps=accumulation_steps, scaler=scaler, start_step=start_step,
            **options,
        )
        self._report = None

    def backward(self, output: Any, backward_fn: Callable[[], object]) -> None:
        """Measure the task losses in ``output`` and let ``backward_fn`` (the framework's own backward of its own
        loss) write ``.grad``; without a monitor or without task losses, only ``backward_fn`` runs."""
        losses = _field(output, self.task_losses_key)
        if not self.running or losses is None:
            if self.running and not self._warned:
                self._warned = True
                warnings.warn(
                    f"gradconflict: the training step returned no {self.task_losses_key!r} field, so nothing is "
                    f"measured; return {{'loss': total, {self.task_losses_key!r}: {{task: loss, ...}}}}, or name the "
                    "field that holds them with task_losses_key=",
                    MeasurementWarning,
                    stacklevel=3,
                )
            backward_fn()
            return
        assert self.monitor is not None
        report = self.monitor.backward(
            losses, _field(output, self.task_weights_key), backward_fn=backward_fn,
            sample_ids=_field(output, self.sample_ids_key),
        )
        if report is not None:
            self._report = report

    def end_group(self) -> None:
        """The optimizer steps now: close a group of micro-batches that ended early (no-op otherwise)."""
        if self.running:
            assert self.monitor is not None
            report = self.monitor.end_group()
            if report is not None:
                self._report = report

    def take_scalars(self) -> dict[str, Tensor]:
        """The figures of the step measured since the last call (:func:`report_scalars`), then forgotten so that
        each step is logged once; empty when no step was measured."""
        report, self._report = self._report, None
        return {} if report is None else report_scalars(report, layers=self.layers)

    def close(self) -> None:
        """Close the monitor (its taps removed, its sinks closed); its history stays readable."""
        if self.monitor is not None:
            self.monitor.close()
