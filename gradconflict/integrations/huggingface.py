"""Hugging Face ``transformers.Trainer``: measure the per-task losses a model returns, report to ``Trainer.log``.

:class:`ConflictTrainer` is a ``Trainer`` that reads ``{task: loss}`` from a field of the model's output
(``outputs["task_losses"]`` by default, a plain dict or a ``ModelOutput`` field), measures them at each
backward, and adds the measured step's figures to the Trainer's next ``log`` call, so that every reporting
integration the Trainer has (TensorBoard, Weights & Biases, ...) receives them. The Trainer's own backward (its
accelerator's, with the loss divided for gradient accumulation and scaled for fp16) still writes ``.grad``.

>>> from gradconflict.integrations.huggingface import ConflictTrainer
>>> ConflictTrainer.__mro__[1].__name__
'Trainer'
"""

from __future__ import annotations

import functools
from typing import Any

import transformers
from torch import Tensor, nn

from gradconflict.integrations.base import FrameworkMonitor
from gradconflict.monitor import ConflictMonitor

__all__ = ["ConflictTrainer"]


class ConflictTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that measures the task losses in the model's output at every measured step.

    The model's forward returns its total ``"loss"`` (what the Trainer trains on, as usual) and ``"task_losses"``
    (``{task: scalar loss}``; optionally ``"task_weights"``, the weights of the total). Every argument of
    ``Trainer`` is accepted, plus the keyword arguments of :class:`~gradconflict.integrations.FrameworkMonitor`:
    ``shared`` (a module path in the model, e.g. ``"backbone"``), ``every`` (default ``None``: the steps the
    Trainer logs, every ``logging_steps``-th, the others costing nothing), ``task_losses_key`` and
    ``task_weights_key`` (the output fields), ``layers`` and ``monitor_options`` (more
    :class:`~gradconflict.ConflictMonitor` arguments; ``on_nonfinite`` defaults to ``"propagate"``).

    The monitor starts with ``train()`` (with ``gradient_accumulation_steps`` as its ``accumulation_steps`` and
    the accelerator's fp16 loss scaler) and is closed when ``train()`` returns or raises; ``conflict_monitor``
    keeps its history for ``advise()``. Each measured step's figures (the tags of
    :func:`~gradconflict.integrations.report_scalars`, as floats) join the Trainer's next ``log`` call, which
    with the default ``every`` is the training log of that very step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        conflict = FrameworkMonitor.options_from(kwargs)  # the rest are the Trainer's
        super().__init__(*args, **kwargs)
        self.conflict = conflict
        self._step_output: Any = None

    @property
    def conflict_monitor(self) -> ConflictMonitor | None:
        """The monitor of the current or last ``train()`` (closed once it returns; its history stays)."""
        return self.conflict.monitor

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, with the monitor closed when it returns or raises."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.conflict.close()

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Tensor | tuple[Tensor, Any]:
        """``Trainer.compute_loss``, keeping the model's output for this step's measurement."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        self._step_output = outputs
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Tensor:
        """``Trainer.training_step``, its backward preceded by the measurement of the task losses."""
        if not self.conflict.running:
            self._start_monitor()
        accelerator_backward = self.accelerator.backward

        def backward(loss: Tensor, **backward_kwargs: Any) -> None:
            self.conflict.backward(self._step_output, functools.partial(accelerator_backward, loss, **backward_kwargs))

        # The Trainer's backward is its accelerator's: route it through the monitor for the length of this step.
        self.accelerator.backward = backward
        try:
            loss = super().training_step(model, inputs, *args, **kwargs)
        finally:
            del self.accelerator.backward
            self._step_output = None
        if self.accelerator.sync_gradients:  # the optimizer steps after this micro-batch
            self.conflict.end_group()
        return loss

    def _start_monitor(self) -> None:
        args = self.args
        steps = str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps"
        self.conflict.start(
            self.model,
            accumulation_steps=args.gradient_accumulation_steps,
            scaler=getattr(self.accelerator, "scaler", None),
            start_step=self.state.global_step + 1,
            log_every=self.state.logging_steps if steps else None,
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``, with the figures of the step measured since the last log."""
        scalars = self.conflict.take_scalars()
        super().log({**logs, **{tag: float(value) for tag, value in scalars.items()}}, *args, **kwargs)
