"""Hugging Face ``transformers.Trainer``: measure the per-task losses a model returns, report to ``Trainer.log``.

:class:`ConflictTrainer` is a ``Trainer`` that reads ``{task: loss}`` from a field of the model's output
(``outputs["task_losses"]`` by default, a plain dict or a ``ModelOutput`` field), measures them at each
backward, and adds the measured step's figures to the Trainer's next ``log`` call, so that every reporting
integration the Trainer has (TensorBoard, Weights & Biases, ...) receives them. The Trainer's own backward (its
accelerator's, with the loss divided for gradient accumulation and scaled for fp16) still writes ``.grad``.
:class:`ConflictCheckpoint`, a ``TrainerCallback`` every ``ConflictTrainer`` carries, saves the monitor's state in
each checkpoint the Trainer writes, and ``train(resume_from_checkpoint=...)`` restores it.

>>> from gradconflict.integrations.huggingface import ConflictTrainer
>>> ConflictTrainer.__mro__[1].__name__
'Trainer'
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from gradconflict.integrations.base import FrameworkMonitor
from gradconflict.monitor import ConflictMonitor

__all__ = ["MONITOR_STATE_NAME", "ConflictCheckpoint", "ConflictTrainer"]

#: The file in each of the Trainer's checkpoint folders (``checkpoint-<step>/``) that holds the monitor's state.
MONITOR_STATE_NAME = "gradconflict_monitor.pt"


class ConflictCheckpoint(transformers.TrainerCallback):
    """Saves the monitor's :meth:`~gradconflict.ConflictMonitor.state_dict` in each checkpoint the Trainer writes,
    as ``checkpoint-<step>/gradconflict_monitor.pt`` (by the process that saves: rank 0 under DDP, where every rank
    holds the same state). Every :class:`ConflictTrainer` adds one to its callbacks; resuming reads the file back.

    >>> ConflictCheckpoint(None).framework is None
    True
    """

    def __init__(self, framework: FrameworkMonitor | None) -> None:
        self.framework = framework

    def on_save(
        self, args: transformers.TrainingArguments, state: transformers.TrainerState, control: Any, **kwargs: Any
    ) -> None:
        """The Trainer has just written ``checkpoint-<step>/``: add the monitor's state to it."""
        monitor = None if self.framework is None else self.framework.monitor
        folder = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if monitor is not None and args.should_save and folder.is_dir():
            torch.save(monitor.state_dict(), folder / MONITOR_STATE_NAME)


class ConflictTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that measures the task losses in the model's output at every measured step.

    The model's forward returns its total ``"loss"`` (what the Trainer trains on, as usual) and ``"task_losses"``
    (``{task: scalar loss}``; optionally ``"task_weights"``, the weights of the total). Every argument of
    ``Trainer`` is accepted, plus the keyword arguments of :class:`~gradconflict.integrations.FrameworkMonitor`:
    ``shared`` (a module path in the model, e.g. ``"backbone"``), ``every`` (default ``None``: the steps the
    Trainer logs, every ``logging_steps``-th, the others costing nothing), ``task_losses_key``,
    ``task_weights_key`` and ``sample_ids_key`` (the output fields: a model whose output carries
    ``"sample_ids"``, the batch's dataset indices, has each measured step attributed to its examples), ``layers``
    and ``monitor_options`` (more
    :class:`~gradconflict.ConflictMonitor` arguments; ``on_nonfinite`` defaults to ``"propagate"``).

    The monitor starts with ``train()`` (with ``gradient_accumulation_steps`` as its ``accumulation_steps`` and
    the accelerator's fp16 loss scaler) and is closed when ``train()`` returns or raises; ``conflict_monitor``
    keeps its history for ``advise()``. Each checkpoint carries the monitor's state (:class:`ConflictCheckpoint`),
    and ``train(resume_from_checkpoint=...)`` resumes the monitor from it along with the model: its step count,
    history and strategy choices go on where they were. Each measured step's figures (the tags of
    :func:`~gradconflict.integrations.report_scalars`, as floats) join the Trainer's next ``log`` call, which
    with the default ``every`` is the training log of that very step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        conflict = FrameworkMonitor.options_from(kwargs)  # the rest are the Trainer's
        super().__init__(*args, **kwargs)
        self.conflict = conflict
        self.add_callback(ConflictCheckpoint(conflict))
        self._step_output: Any = None
        self._resume_from: Path | None = None

    @property
    def conflict_monitor(self) -> ConflictMonitor | None:
        """The monitor of the current or last ``train()`` (closed once it returns; its history stays)."""
        return self.conflict.monitor

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, the monitor resumed from the checkpoint's state when resuming, and closed when it
        returns or raises."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:  # as the Trainer reads it: the last checkpoint of output_dir
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_from = Path(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.conflict.close()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """``Trainer.compute_loss``, keeping the model's output for this step's measurement."""
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
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
        saved = None if self._resume_from is None else self._resume_from / MONITOR_STATE_NAME
        if saved is not None and saved.is_file():
            assert self.conflict.monitor is not None
            self.conflict.monitor.load_state_dict(torch.load(saved, weights_only=True))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``, with the figures of the step measured since the last log."""
        scalars = self.conflict.take_scalars()
        super().log({**logs, **{tag: float(value) for tag, value in scalars.items()}}, *args, **kwargs)
