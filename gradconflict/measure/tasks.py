"""One step's tasks: their losses and weights, keyed by name, checked without waiting for the device.

>>> import torch
>>> x = torch.ones(2, requires_grad=True)
>>> step = task_losses({"a": x.sum(), 1: (2 * x).sum()}, weights={1: 0.5})
>>> step.names, step.weight_vector().tolist()
(('a', '1'), [1.0, 0.5])
>>> step.total().item()
4.0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["TaskKey", "TaskLosses", "task_losses"]

#: A task's name: any hashable. A type variable, because a mapping's key type is invariant (``dict[str, Tensor]``
#: is not a ``Mapping[Hashable, Tensor]``).
TaskKey = TypeVar("TaskKey", bound=Hashable)


@dataclass
class TaskLosses:
    """The losses and weights of one step.

    Attributes:
        names: task names (``str`` of the keys), in the order given.
        losses: each task's scalar loss (0-dim, attached to its graph).
        weights: each task's weight as given: a number, or a scalar tensor (which may require grad: a learned
            weight then receives its gradient from :meth:`total`'s backward).
    """

    names: tuple[str, ...]
    losses: list[Tensor]
    weights: list[float | Tensor]

    def total(self) -> Tensor:
        """``sum_i w_i L_i``, the loss whose backward trains the model (learned weights stay attached)."""
        terms = [loss if isinstance(w, float) and w == 1.0 else w * loss for w, loss in zip(self.weights, self.losses)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def weight_vector(self) -> Tensor:
        """The weights, detached, as one ``[T]`` tensor: on the host when they are all numbers (no device copy),
        otherwise on the losses' device."""
        if all(isinstance(w, float) for w in self.weights):
            return torch.tensor(self.weights, dtype=torch.float64)
        device = self.losses[0].device
        return torch.stack([torch.as_tensor(w, device=device).detach().double().reshape(()) for w in self.weights])

    def loss_vector(self) -> Tensor:
        """The losses, detached, as one ``[T]`` tensor on their device."""
        return torch.stack([loss.detach() for loss in self.losses])

    @property
    def device_weights(self) -> list[Tensor]:
        """The weights that are tensors on the losses' device: their values are checked with the losses' at a
        measured step, not here (reading them would wait for the device)."""
        return [w for w in self.weights if isinstance(w, Tensor) and w.device.type != "cpu"]


def _name(key: Hashable) -> str:
    return key if isinstance(key, str) else str(key)


def _check_number(task: str, number: float) -> None:
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"weight of task {task!r} is {number}; weights must be finite and >= 0")


def _weight(task: str, value: object, device: torch.device) -> float | Tensor:
    """A weight as a float, or as a scalar tensor when it is a tensor on the device or one that requires grad."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"weight of task {task!r} is a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; a "
                "weight must be a real number or a scalar real tensor"
            )
        value = value.reshape(())
        if value.device.type == "cpu":
            _check_number(task, float(value.detach()))  # a host value: no device to wait for
            return value if value.requires_grad else float(value)
        if value.device != device:
            raise ValueError(f"weight of task {task!r} is on {value.device}, its loss on {device}")
        return value  # checked with the losses at the next measured step (reading it here would wait for the device)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"weight of task {task!r} is a {type(value).__name__} ({value!r}); weights must be numbers or scalar "
            "tensors"
        )
    number = float(value)
    _check_number(task, number)
    return number


def task_losses(losses: Mapping[TaskKey, Tensor], weights: Mapping[TaskKey, object] | None = None) -> TaskLosses:
    """Check and name one step's losses and weights. Every check runs on the host: nothing waits for the device.

    Tasks are named by ``str(key)``; the weights are matched to the losses by the same names, so integer keys
    work as well as strings. Raises ``TypeError`` or ``ValueError`` naming what is wrong and what to pass.
    """
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("losses must be a non-empty dict {task name: scalar loss tensor}")
    names: dict[str, TaskKey] = {}
    for key in losses:
        name = _name(key)
        if name in names:
            raise ValueError(f"task keys {names[name]!r} and {key!r} both name the task {name!r}; use distinct names")
        names[name] = key
    values = []
    for name, key in names.items():
        loss = losses[key]
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss {name!r} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(
                f"loss {name!r} has shape {tuple(loss.shape)}; each loss must be a scalar (reduce it, e.g. with "
                ".mean())"
            )
        if not loss.requires_grad:
            raise ValueError(f"loss {name!r} does not require grad: was it computed under torch.no_grad()?")
        values.append(loss.reshape(()))
    devices = {loss.device for loss in values}
    if len(devices) > 1:
        where = ", ".join(f"{n}: {loss.device}" for n, loss in zip(names, values))
        raise ValueError(f"the losses are on different devices ({where}); move them to one device")
    given: dict[str, object] = {}
    for key, value in (weights or {}).items():
        name = _name(key)
        if name in given:
            raise ValueError(f"weight keys name the task {name!r} twice")
        given[name] = value
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"weights name unknown tasks {unknown}; the tasks are {list(names)}")
    device = values[0].device
    w = [_weight(name, given.get(name, 1.0), device) for name in names]
    return TaskLosses(tuple(names), values, w)
