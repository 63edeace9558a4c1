"""Nash-MTL: the update of the Nash bargaining solution between the tasks, by the authors' iterative solver (run by
TorchJD), with its warm start kept across steps and restorable.

>>> import torch
>>> nash = NashMTL(max_norm=0.0)
>>> nash(torch.tensor([[4.0]]), {"a": 1.0})        # one task: alpha = 1 / |g|
tensor([0.5000], dtype=torch.float64)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradconflict.weighting.base import Weighting
from gradconflict.weighting.peers import gram_factor, torchjd

__all__ = ["NashMTL", "no_bargaining_solution"]


def no_bargaining_solution(gram: Tensor, rtol: float = 1e-6) -> bool:
    """Whether a non-negative combination of the task gradients vanishes (``G d = 0`` for some ``d >= 0, d != 0``):
    then no update improves every task, and ``alpha_i (G alpha)_i = 1`` has no solution. True for a zero gradient;
    otherwise decided by a linear program on the null space of the cosine matrix (scale-free: a small gradient is
    not a zero one), whose eigenvalues below ``rtol`` count as 0.

    >>> no_bargaining_solution(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))   # opposite
    True
    >>> no_bargaining_solution(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64))     # identical
    False
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms == 0).any()):
        return True
    values, vectors = torch.linalg.eigh(gram / norms[:, None] / norms[None, :])
    null = vectors[:, values <= rtol].numpy()
    if null.shape[1] == 0:
        return False
    # the largest sum(N c) with N c >= 0 and sum(N c) <= 1: 1 when a non-negative null vector exists, else 0
    total = null.sum(0)
    from scipy.optimize import linprog  # here: `import gradconflict` must not load scipy

    found = linprog(
        -total,
        A_ub=np.vstack([-null, total]),
        b_ub=np.r_[np.zeros(len(null)), 1.0],
        bounds=[(None, None)] * null.shape[1],
    )
    return bool(found.status == 0 and -found.fun > 0.5)


class NashMTL(Weighting):
    """Nash-MTL: weights ``alpha > 0`` with ``alpha_i (G alpha)_i = 1`` for every task, the Nash bargaining solution
    in which each task's first-order gain ``<g_i, d>`` is traded against the others' (``d = sum_i alpha_i g_i``).

    Source: A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik and E. Fetaya, "Multi-Task
    Learning as a Bargaining Game", ICML 2022, Algorithm 1. The solver is the authors' (as adapted in TorchJD 0.18's
    ``NashMTL``, which needs cvxpy and ECOS): a sequence of ``optim_niter`` convex approximations (each solved by
    ECOS) on the Gram divided by its Frobenius norm, stopped early when ``|G alpha - 1/alpha| < 1e-3`` or alpha
    stops moving, warm-started from the previous step's alpha (1 each at the first step). The weights are then
    scaled down so that ``|d| <= max_norm`` (the authors' gradient clipping; 0 turns it off); with
    ``update_weights_every = k`` the weights are solved every k-th call and reused, re-clipped, in between.

    The warm start is this object's state: :meth:`state_dict` carries it. A step whose tasks differ from the
    previous step's starts afresh (alpha = 1). When the bargaining problem has no solution (a non-negative
    combination of the gradients vanishes: a zero gradient, exactly opposite tasks, see
    :func:`no_bargaining_solution`) the previous alpha is kept without solving, as the authors' solver does when
    it fails (the solver, fed such a Gram, returns arbitrary large weights or fails). One task: ``alpha = 1/|g|``
    (the exact solution; TorchJD's solver does not take one task).

    Args:
        max_norm: largest norm of the update (0: no clipping); the authors' default, 1.
        update_weights_every: solve every this many calls (the authors' default, 1).
        optim_niter: most convex approximations per solve (the authors' default, 20).

    >>> import torch
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)   # orthogonal: alpha_i = 1 / |g_i|
    >>> alpha = NashMTL(max_norm=0.0)(G, {"a": 0.0, "b": 0.0})
    >>> [round(a, 3) for a in alpha.tolist()]
    [1.0, 0.5]
    """

    name = "nash-mtl"

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        for label, value in (("update_weights_every", update_weights_every), ("optim_niter", optim_niter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if not max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
        self._aggregation = torchjd("Nash-MTL")
        self._aggregation.NashMTL(n_tasks=1)  # raises ImportError now, not at the first step, without cvxpy/ECOS
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self._tasks: tuple[str, ...] = ()
        self._solver: Any = None
        self._alpha = np.ones(0)
        self._calls = 0

    def _start(self, tasks: tuple[str, ...], alpha: np.ndarray | None = None) -> None:
        solver = self._aggregation.NashMTL(n_tasks=len(tasks), max_norm=0.0, optim_niter=self.optim_niter).weighting
        if alpha is not None:
            solver.prvs_alpha = alpha
        self._tasks, self._solver, self._calls = tasks, solver, 0
        self._alpha = np.asarray(solver.prvs_alpha, dtype=np.float64)

    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> Tensor:
        tasks = tuple(losses)
        if tasks != self._tasks:
            self._start(tasks)
        if self._calls % self.update_weights_every == 0:
            if len(tasks) == 1:
                norm = math.sqrt(gram[0, 0].item())
                self._alpha = np.array([1 / norm]) if norm > 0 else self._alpha
            elif not no_bargaining_solution(gram):
                with warnings.catch_warnings():
                    # cvxpy says at each solve that the authors' problem is not DPP (it is rebuilt each time)
                    warnings.filterwarnings("ignore", message=".*not DPP.*")
                    self._solver(gram_factor(gram))
                self._alpha = np.asarray(self._solver.prvs_alpha, dtype=np.float64)
        self._calls += 1
        alpha = torch.from_numpy(self._alpha.copy())
        norm = math.sqrt(max(float(alpha @ gram @ alpha), 0.0))
        if self.max_norm > 0 and norm > self.max_norm:
            alpha = alpha / norm * self.max_norm
        return alpha

    def state_dict(self) -> dict[str, Any]:
        """The tasks, the warm start (the last solved alpha) and the number of calls since the tasks changed."""
        return {"tasks": list(self._tasks), "alpha": self._alpha.tolist(), "calls": self._calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next solve starts from the saved alpha."""
        tasks = tuple(state["tasks"])
        if tasks:
            self._start(tasks, np.asarray(state["alpha"], dtype=np.float64))
            self._calls = int(state["calls"])

    def __repr__(self) -> str:
        return (
            f"NashMTL(max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
            f"optim_niter={self.optim_niter})"
        )
