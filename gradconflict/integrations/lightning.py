"""PyTorch Lightning 2.x: measure the task losses that ``training_step`` returns, and log them with ``self.log``.

Two pieces, each one of Lightning's own extension points:

- :class:`ConflictMonitorMixin`, mixed into the ``LightningModule``, overrides its ``backward`` hook: the task
  losses of the step (the ``"task_losses"`` field of what ``training_step`` returned) are measured, then
  Lightning's own backward runs on Lightning's own loss, so loss scaling (the precision plugin's scaler),
  gradient accumulation (the loss divided by ``accumulate_grad_batches``) and DDP behave exactly as without it.
- :class:`ConflictCallback` attaches the monitor when fitting starts (with the trainer's accumulation, scaler and
  step count), closes short accumulation groups when the optimizer steps, logs each measured step through
  ``pl_module.log_dict`` (so every logger the trainer has receives it, on its ``log_every_n_steps`` schedule),
  saves the monitor in checkpoints and closes it when fitting ends.

Automatic optimization only: under manual optimization call a monitor's ``backward`` yourself.

>>> import lightning.pytorch as pl
>>> class Model(ConflictMonitorMixin, pl.LightningModule):
...     def training_step(self, batch, batch_idx):
...         ...
>>> callback = ConflictCallback(shared="backbone")
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from gradconflict.integrations.base import FrameworkMonitor
from gradconflict.monitor import ConflictMonitor

__all__ = ["ConflictCallback", "ConflictMonitorMixin"]

# The last output of each module's training_step, until its backward reads it (nothing is stored on the module).
_STEP_OUTPUTS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def _recording(training_step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(training_step)
    def step(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = training_step(self, *args, **kwargs)
        _STEP_OUTPUTS[self] = output
        return output

    step.__gradconflict_records__ = True  # type: ignore[attr-defined]
    return step


class ConflictMonitorMixin:
    """Mix into a ``LightningModule`` (before it in the bases) to measure the task losses ``training_step``
    returns; add a :class:`ConflictCallback` to the ``Trainer`` to turn it on.

    ``training_step`` returns ``{"loss": total, "task_losses": {task: loss, ...}}`` (and optionally
    ``"task_weights": {task: weight}``, the weights of the total, default 1). The mixin wraps the class's
    ``training_step`` to keep that output until ``backward``, and overrides ``backward``: the monitor measures the
    task losses, then Lightning's own ``backward`` writes ``.grad`` from Lightning's ``loss``. Without a
    :class:`ConflictCallback` on the trainer, or on a step without task losses, ``backward`` is Lightning's own.

    >>> import lightning.pytorch as pl
    >>> class Model(ConflictMonitorMixin, pl.LightningModule):
    ...     def training_step(self, batch, batch_idx):
    ...         return {"loss": ..., "task_losses": {}}
    >>> Model.training_step.__gradconflict_records__
    True
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = getattr(cls, "training_step", None)
        if step is None or step is pl.LightningModule.training_step or hasattr(step, "__gradconflict_records__"):
            return
        cls.training_step = _recording(step)  # type: ignore[attr-defined]

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Measure this step's task losses, then run Lightning's own backward on ``loss``."""
        output = _STEP_OUTPUTS.pop(self, None)  # type: ignore[call-overload]
        lightning_backward = functools.partial(super().backward, loss, *args, **kwargs)  # type: ignore[misc]
        callback = _callback(self)
        if callback is None:
            lightning_backward()
        else:
            callback.framework.backward(output, lightning_backward)


def _callback(module: pl.LightningModule) -> ConflictCallback | None:
    try:
        callbacks = module.trainer.callbacks
    except RuntimeError:  # not attached to a Trainer
        return None
    return next((c for c in callbacks if isinstance(c, ConflictCallback)), None)


class ConflictCallback(pl.Callback):
    """Monitors a :class:`ConflictMonitorMixin` module during ``Trainer.fit`` and logs what it measures.

    Args:
        options: the arguments of :class:`~gradconflict.integrations.FrameworkMonitor`: ``shared`` (a module
            path in the ``LightningModule``, e.g. ``"backbone"``), ``every`` (default ``None``: the steps the
            trainer logs, every ``log_every_n_steps``-th, every step under ``fast_dev_run``), ``task_losses_key``,
            ``task_weights_key`` and ``sample_ids_key`` (the fields of ``training_step``'s output: with
            ``"sample_ids"``, the batch's dataset indices, each measured step is attributed to its examples),
            ``layers`` and ``monitor_options`` (more :class:`~gradconflict.ConflictMonitor` arguments).

    The trainer's ``accumulate_grad_batches`` becomes the monitor's ``accumulation_steps``, its precision
    plugin's loss scaler (``"16-mixed"``) the monitor's ``scaler``. Each measured step is logged with
    ``pl_module.log_dict(..., on_step=True, on_epoch=False)`` under the tags of
    :func:`~gradconflict.integrations.report_scalars` (``conflict/cos/<a>-<b>``, ``conflict/cancellation``, ...).
    Under DDP each process measures its own micro-batch, every rank reports the global batch's Gram (with the
    monitor's default ``sync="exact"``) and rank 0's logger writes it.

    Attributes:
        monitor: the :class:`~gradconflict.ConflictMonitor` of the current or last fit (closed when fitting ends;
            its ``history`` and ``advise()`` stay available).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.framework = FrameworkMonitor(**options)
        self._loaded: dict[str, Any] | None = None

    @property
    def monitor(self) -> ConflictMonitor | None:
        """The monitor of the current or last fit (``None`` before fitting)."""
        return self.framework.monitor

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the monitor with the trainer's accumulation, loss scaler and step count."""
        # a check of the type, not isinstance: for the type checker pl_module stays a LightningModule below
        if not issubclass(type(pl_module), ConflictMonitorMixin):
            raise TypeError(
                f"ConflictCallback needs the LightningModule to take ConflictMonitorMixin: declare "
                f"`class {type(pl_module).__name__}(ConflictMonitorMixin, LightningModule)` so that its backward "
                "hook measures the task losses training_step returns"
            )
        mro = type(pl_module).__mro__
        if mro.index(ConflictMonitorMixin) > mro.index(pl.LightningModule):
            raise TypeError(
                f"{type(pl_module).__name__} lists LightningModule before ConflictMonitorMixin, so Lightning's "
                "backward hides the mixin's: put the mixin first, `class Model(ConflictMonitorMixin, LightningModule)`"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "ConflictCallback measures under automatic optimization; with manual optimization call "
                "ConflictMonitor(self).backward(task_losses) in training_step instead of self.manual_backward"
            )
        self.framework.start(
            pl_module,
            accumulation_steps=trainer.accumulate_grad_batches,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            start_step=trainer.global_step + 1,
            log_every=1 if trainer.fast_dev_run else trainer.log_every_n_steps,  # fast_dev_run logs every step
        )
        if self._loaded:
            assert self.monitor is not None
            self.monitor.load_state_dict(self._loaded)
            self._loaded = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """The optimizer steps: a group of micro-batches cut short by the end of an epoch ends here."""
        self.framework.end_group()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the step measured in this batch, if any, through ``pl_module.log_dict``."""
        scalars = self.framework.take_scalars()
        if scalars:
            pl_module.log_dict(scalars, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the monitor: training is over."""
        self.framework.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Close the monitor: fitting stopped on an error."""
        self.framework.close()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's :meth:`~gradconflict.ConflictMonitor.state_dict`, saved in Lightning's checkpoints."""
        return self.monitor.state_dict() if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the monitor from a checkpoint (applied when fitting starts)."""
        self._loaded = dict(state_dict) or None
