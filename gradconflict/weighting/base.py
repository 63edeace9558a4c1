"""What a weighting is: a map from one step's Gram of the task gradients (and its losses) to the weights
``lambda`` of a conflict-aware update ``sum_i lambda_i g_i``.

A :class:`Weighting` receives the Gram as a T x T float64 tensor on the host, in the order of ``losses`` (a dict
task name -> loss value), and returns T weights: a tensor or sequence in that order, or a dict by task name.
Calling it checks what it returned, so a faulty rule fails with a message naming it, not deep in autograd.

>>> import torch
>>> def inverse_norm(gram, losses):          # any (gram, losses) -> weights callable is a weighting
...     return 1 / gram.diagonal().sqrt()
>>> FunctionWeighting(inverse_norm)(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), {"a": 1.0, "b": 2.0})
tensor([0.5000, 1.0000], dtype=torch.float64)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["FunctionWeighting", "Weighting", "WeightingError", "WeightingFn", "WeightingWarning"]

#: A weighting written as a function: ``(gram, losses) -> weights``.
WeightingFn = Callable[[Tensor, Mapping[str, float]], Any]


class WeightingError(RuntimeError):
    """A weighting could not produce weights for this step (e.g. its solver failed). The monitor then keeps the
    last weights, warns with a :class:`WeightingWarning` and trains on."""


class WeightingWarning(RuntimeWarning):
    """A step was trained with other weights than its own: the method failed on it, or its tasks differ from
    those of the last measured step (see :mod:`gradconflict.weighting`)."""


def _check_weights(name: str, weights: Any, tasks: list[str]) -> Tensor:
    """``weights`` (a tensor or sequence in task order, or a dict by task name) as a float64 host vector of length
    ``len(tasks)``; ``ValueError`` naming the weighting when it is not that, or not finite."""
    if isinstance(weights, Mapping):
        missing = [t for t in tasks if t not in weights]
        if missing:
            raise ValueError(f"weighting {name!r} returned no weight for task(s) {missing}; the tasks are {tasks}")
        weights = [weights[t] for t in tasks]
    try:
        # numbers straight to float64 (through torch's default float32 they would lose digits)
        vector = torch.as_tensor(weights, dtype=None if isinstance(weights, Tensor) else torch.float64)
        vector = vector.detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"weighting {name!r} returned {type(weights).__name__}, not T = {len(tasks)} numbers: return a tensor, "
            "a sequence in the order of the losses, or a dict by task name"
        ) from err
    if vector.shape != (len(tasks),):
        raise ValueError(
            f"weighting {name!r} returned weights of shape {tuple(vector.shape)} for {len(tasks)} tasks {tasks}; "
            f"expected ({len(tasks)},)"
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"weighting {name!r} returned non-finite weights {vector.tolist()} for tasks {tasks}")
    return vector


class Weighting(ABC):
    """A conflict-aware combination rule: one step's Gram (and losses) -> the weights of its update.

    Subclasses implement :meth:`weights`. A rule that keeps state across steps (a random generator, a warm
    start) returns it from :meth:`state_dict` and takes it back in :meth:`load_state_dict`, so that a resumed
    run continues exactly; it never touches torch's or numpy's global random state.

    Attributes:
        name: the rule's name, as shown in the comparison table (``"shared+<name>"``) and stored in state dicts.

    >>> import torch
    >>> class Equal(Weighting):
    ...     name = "equal"
    ...     def weights(self, gram, losses):
    ...         return torch.ones(len(losses))
    >>> Equal()(torch.eye(3), {"a": 0.1, "b": 0.2, "c": 0.3})
    tensor([1., 1., 1.], dtype=torch.float64)
    """

    name: str = "weighting"

    def __call__(self, gram: Tensor, losses: Mapping[str, float]) -> Tensor:
        """The checked weights (float64, on the host) for ``gram`` (T x T) and ``losses`` (task -> value, in
        the Gram's order)."""
        tasks = list(losses)
        gram = gram.detach().to(device="cpu", dtype=torch.float64)
        if gram.shape != (len(tasks), len(tasks)):
            raise ValueError(f"gram has shape {tuple(gram.shape)} for {len(tasks)} tasks; expected a T x T Gram")
        return _check_weights(self.name, self.weights(gram, losses), tasks)

    @abstractmethod
    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> Any:
        """The weights for a float64 host Gram, in the order of ``losses`` (or a dict by task name)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this rule exactly (empty for a rule without state)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a rule without state takes only its empty state)."""
        if state:
            raise ValueError(f"weighting {self.name!r} keeps no state, but was given {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FunctionWeighting(Weighting):
    """A ``(gram, losses) -> weights`` callable as a :class:`Weighting`, named after the function.

    >>> import torch
    >>> FunctionWeighting(lambda gram, losses: {"b": 2.0, "a": 1.0})(torch.eye(2), {"a": 0.0, "b": 0.0})
    tensor([1., 2.], dtype=torch.float64)
    """

    def __init__(self, fn: WeightingFn) -> None:
        if not callable(fn):
            raise TypeError(f"a weighting function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> Any:
        return self.fn(gram, dict(losses))

    def __repr__(self) -> str:
        return f"FunctionWeighting({self.name})"
