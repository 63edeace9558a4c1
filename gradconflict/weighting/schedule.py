"""The monitor's side of ``weighting=``: the method in use, the weights of the last measured step (which the
unmeasured and skipped steps reuse), the backward that applies them, and the state a resumed run needs.

>>> import torch
>>> from gradconflict.measure.tasks import task_losses
>>> x = torch.ones(2, requires_grad=True)
>>> batch = task_losses({"a": x.sum(), "b": -x.sum()})
>>> steps = StepWeights()
>>> steps.select("mgda")
>>> steps.update(batch, torch.tensor([[2.0, -2.0], [-2.0, 2.0]]))   # opposite tasks: MGDA stops
tensor([0.5000, 0.5000], dtype=torch.float64)
>>> steps.backward(batch, lambda total: total.backward())
>>> x.grad
tensor([0., 0.])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradconflict.measure.tasks import TaskLosses
from gradconflict.weighting.base import Weighting, WeightingError, WeightingWarning
from gradconflict.weighting.registry import WeightingSpec, make_weighting
from gradconflict.weighting.routing import weighted_backward

__all__ = ["StepWeights"]


class StepWeights:
    """Which weighting the current step uses, and the weights it trains with.

    A step with its own Gram (a measured step) computes its weights ``lambda`` from it: the method sees the
    Gram of the weighted tasks ``w_i L_i`` (the user's ``weights=``), tasks with weight 0 left out (their
    ``lambda`` is 0). A step without one (unmeasured under ``every=k``, or skipped) reuses the last measured
    step's ``lambda`` when it carries the same tasks, and otherwise trains with the plain weighted sum (and says
    so once). The update on the shared parameters is ``sum_i lambda_i w_i g_i``; each task's own parameters
    get the gradient of ``w_i L_i`` (see :mod:`gradconflict.weighting.routing`).

    >>> steps = StepWeights()
    >>> steps.select("pcgrad")
    >>> steps.state_dict()["method"], steps.active
    ('pcgrad', True)
    """

    def __init__(self) -> None:
        self.active = False
        self.method: Weighting | None = None
        self._spec: object = None
        self._last: dict[str, float] = {}  # lambda by task, from the last measured step
        self._saved: Mapping[str, Any] = {}  # a loaded state, waiting for the method it names
        self._warned: set[str] = set()

    def select(self, spec: WeightingSpec | None, accumulation_steps: int = 1) -> None:
        """Use ``spec`` for this step (``None``: the plain weighted sum). The same name or object as the last
        call keeps the method and its state; another starts afresh."""
        if spec is None:
            self.active = False
            return
        if accumulation_steps > 1:
            raise ValueError(
                "weighting= does not work with accumulation_steps > 1: the weights come from the whole step's Gram, "
                "known only after its last micro-batch has written .grad. Use a larger batch (or accumulate "
                "without a weighting)"
            )
        same = spec is self._spec or (isinstance(spec, str) and spec == self._spec)
        if self.method is None or not same:
            method = make_weighting(spec)
            self._last = {}
            if self._saved.get("method") == method.name:
                method.load_state_dict(self._saved.get("state", {}))
                self._last = dict(self._saved.get("last", {}))
                self._saved = {}
            self.method, self._spec = method, spec
        self.active = True

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradconflict: {message}", WeightingWarning, stacklevel=5)

    def current(self, names: tuple[str, ...]) -> Tensor | None:
        """This step's ``lambda`` in the order of ``names``: the last measured step's, or ``None`` (the plain
        weighted sum) when no weighting is active or no measured step carried these tasks."""
        if not self.active:
            return None
        if set(names) != set(self._last):
            why = f"step's tasks {sorted(names)} differ from the last measured step's" if self._last else "no step"
            self._warn(
                f"no weights {sorted(names)}",
                f"{why} has given {self.method.name if self.method else ''} weights for these tasks yet; such steps "
                "train with the plain weighted sum (measure every step, every=1, when the tasks change often)",
            )
            return None
        return torch.tensor([self._last[n] for n in names], dtype=torch.float64)

    def effective(self, batch: TaskLosses) -> Tensor:
        """The weights ``lambda_i w_i`` of the update this step trains with (without a weighting: ``w``)."""
        user = batch.weight_vector()
        scales = self.current(batch.names)
        return user if scales is None else scales.to(user.device) * user

    def update(self, batch: TaskLosses, gram: Tensor) -> Tensor:
        """This measured step's weights from its Gram (read on the host): remembered for the steps that follow,
        and returned as ``lambda_i w_i``. A non-finite Gram or loss, or a method that fails (a
        :class:`WeightingError`), keeps the last weights."""
        given = batch.weight_vector()
        if not self.active or self.method is None:
            return given
        user = given.to(device="cpu", dtype=torch.float64)
        G = gram.detach().to(device="cpu", dtype=torch.float64)
        losses = batch.loss_vector().detach().to(device="cpu", dtype=torch.float64)
        if not (bool(torch.isfinite(G).all()) and bool(torch.isfinite(losses).all())):
            return self.effective(batch)
        keep = torch.nonzero(user > 0).flatten()
        scales = torch.zeros(len(user), dtype=torch.float64)
        if len(keep):
            w = user[keep]
            scaled = {batch.names[i]: float(user[i] * losses[i]) for i in keep.tolist()}
            try:
                scales[keep] = self.method(G[keep][:, keep] * w[:, None] * w[None, :], scaled)
            except WeightingError as err:
                self._warn(
                    f"failed {err}",
                    f"{err}; this step keeps the last weights (if it recurs, choose another weighting= method)",
                )
                return self.effective(batch)
        self._last = dict(zip(batch.names, scales.tolist()))
        return (scales * user).to(given.device)

    def backward(
        self,
        batch: TaskLosses,
        run: Callable[[Tensor], None],
        shared: set[int] | None = None,
        param_names: Mapping[int, str] | None = None,
        segment_leaves: Callable[[Any], Sequence[Tensor]] | None = None,
    ) -> None:
        """``run(total)`` with this step's weights applied (a plain ``run(batch.total())`` without them).
        With ``shared`` (parameter ids) and ``param_names`` (id -> name of every model parameter), the model
        parameters that get the weighted combination without being shared ones are named, once, in a warning.
        ``segment_leaves`` looks into reentrant checkpoint segments (see
        :func:`~gradconflict.weighting.routing.weighted_backward`)."""
        scales = self.current(batch.names)
        if scales is None:
            run(batch.total())
            return
        leaves = weighted_backward(batch, scales.tolist(), run, shared, segment_leaves)
        if shared is not None and param_names is not None:
            others = [param_names[id(p)] for p in leaves if id(p) in param_names and id(p) not in shared]
            if others:
                self._warn(
                    "unshared",
                    f"parameters {others[:5]}{' ...' if len(others) > 5 else ''} receive gradient from several tasks "
                    "(or sit inside a compiled region, where autograd cannot tell the tasks apart) but are not the "
                    "measured shared parameters: they get the weighted combination too. Pass shared= to measure them",
                )

    def state_dict(self) -> dict[str, Any]:
        """The method's name and state, and the last measured step's weights."""
        method = self.method
        return {
            "method": None if method is None else method.name,
            "state": {} if method is None else method.state_dict(),
            "last": dict(self._last),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: now if the method in use has the saved name, else when one that has it is
        selected."""
        self._saved = dict(state)
        method = self.method
        if method is not None and state.get("method") == method.name:
            method.load_state_dict(state.get("state", {}))
            self._last = dict(state.get("last", {}))
            self._saved = {}
