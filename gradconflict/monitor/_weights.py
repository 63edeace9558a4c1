"""The weights a step trains with: the user's ``weights=`` in the forms it accepts, and the one ordinary backward
that writes ``.grad`` with them (weighted by a conflict-aware method's ``lambda`` when one is active)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from gradconflict.measure.tasks import TaskKey, TaskLosses
from gradconflict.monitor._plan import Planner
from gradconflict.monitor._scaling import Scaling
from gradconflict.weighting import StepWeights

__all__ = ["FREED", "graph_freed", "weights_by_task", "write_grads"]

FREED = (
    "the graph of these losses was already freed by a backward pass (another monitor, or your own .backward()): "
    "call monitor.backward(losses) instead of loss.backward(), or monitor.measure(losses) before your own backward"
)


def graph_freed(err: BaseException) -> bool:
    """Whether ``err`` is autograd's complaint about a graph that a backward already freed."""
    text = str(err)
    return "second time" in text or "have already been freed" in text


def weights_by_task(losses: Mapping[TaskKey, Tensor], weights: Any) -> Mapping[TaskKey, object] | None:
    """``weights`` as a mapping from the task keys of ``losses``.

    A mapping is taken as it is. A list, a tuple or a 1-dimensional tensor holds one weight per task in the
    order of ``losses``' keys (a dict's insertion order); the elements of a tensor that requires grad keep it, so
    a learned weight vector receives its gradient. Anything else raises ``TypeError`` naming the forms accepted.

    >>> import torch
    >>> x = torch.ones((), requires_grad=True)
    >>> weights_by_task({"a": x, "b": 2 * x}, [1.0, 0.5])
    {'a': 1.0, 'b': 0.5}
    """
    if weights is None or isinstance(weights, Mapping) or not isinstance(losses, Mapping):
        return weights  # (losses that are not a dict are refused with their own message)
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(
                f"weights is a tensor of shape {tuple(weights.shape)}; pass a 1-dimensional tensor with one weight per "
                "task, in the order of the losses' keys, or a dict {task name: weight}"
            )
        values: list[object] = list(weights.unbind())
    elif isinstance(weights, (list, tuple)):
        values = list(weights)
    else:
        raise TypeError(
            f"weights is a {type(weights).__name__}; pass a dict {{task name: weight}}, or a list, tuple or "
            "1-dimensional tensor with one weight per task in the order of the losses' keys"
        )
    if len(values) != len(losses):
        raise ValueError(
            f"weights holds {len(values)} values for {len(losses)} losses; a list, tuple or tensor of weights needs "
            f"one per task, in the order of the losses' keys {list(losses)}"
        )
    return dict(zip(losses, values))


def write_grads(batch: TaskLosses, scaling: Scaling, weighting: StepWeights, planner: Planner) -> None:
    """``.grad`` by autograd's own backward of ``sum_i w_i L_i`` (scaled, under a GradScaler), the shared part of
    each task's gradient scaled by the weighting's ``lambda_i`` when one is active (the ``planner`` knows the
    measured parameters, which the weighting's warnings tell apart from the others)."""
    shared = None if planner.plan is None else planner.plan.shared
    try:
        weighting.backward(batch, scaling.backward, shared, planner.shared.names, planner.shared.expand)
    except RuntimeError as err:
        if graph_freed(err):
            raise RuntimeError(FREED) from err
        raise
