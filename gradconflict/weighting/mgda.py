"""MGDA: the minimum-norm point of the convex hull of the task gradients (native: works without TorchJD).

>>> import torch
>>> MGDA()(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), {"a": 1.0, "b": 1.0})   # opposite tasks: no update
tensor([0.5000, 0.5000], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import Tensor

from gradconflict.weighting.base import Weighting

__all__ = ["MGDA"]


class MGDA(Weighting):
    """Multiple-gradient descent: the weights ``alpha`` on the simplex that minimise ``||sum_i alpha_i g_i||^2 =
    alpha^T G alpha``.

    Source: J.-A. Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
    Comptes Rendus Mathématique 350 (2012); solved as in O. Sener and V. Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018, Algorithm 2: Frank-Wolfe from ``alpha = 1/T``, each step towards
    the vertex ``e_t`` with ``t = argmin_r (G alpha)_r`` with the exact line search of their Algorithm 1, stopped
    when the step size ``gamma`` falls below ``epsilon`` or after ``max_iters`` steps.

    The update is the common descent direction of largest guaranteed decrease: every task's loss falls to first
    order, or the update is 0 when the tasks are Pareto-stationary (some convex combination of their gradients
    vanishes: exactly opposite tasks, a task with a zero gradient). The weights sum to 1, so the update is a
    convex combination, never longer than the shortest task gradient.

    Args:
        epsilon: stop when the Frank-Wolfe step ``gamma`` is below this (TorchJD's default, 1e-3).
        max_iters: most Frank-Wolfe steps (TorchJD's default, 100).

    >>> import torch
    >>> MGDA()(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), {"a": 0.0, "b": 0.0})  # orthogonal: 1/n_i^2, normalised
    tensor([0.8000, 0.2000], dtype=torch.float64)
    """

    name = "mgda"

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100) -> None:
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon!r}")
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
        self.epsilon = float(epsilon)
        self.max_iters = max_iters

    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> np.ndarray:
        G = gram.numpy()
        alpha = np.full(len(G), 1.0 / len(G))
        for _ in range(self.max_iters):
            t = int(np.argmin(G @ alpha))
            # Algorithm 1 with theta = g_t and theta_bar = G^T alpha: a = <theta, theta_bar>, b = |theta_bar|^2,
            # c = |theta|^2; gamma minimises |gamma theta + (1 - gamma) theta_bar|^2 over [0, 1].
            a, b, c = alpha @ G[:, t], alpha @ G @ alpha, G[t, t]
            if c <= a:
                gamma = 1.0
            elif b <= a:
                gamma = 0.0
            else:
                gamma = (b - a) / (b + c - 2 * a)
            alpha = (1 - gamma) * alpha
            alpha[t] += gamma
            if gamma < self.epsilon:
                break
        return alpha

    def __repr__(self) -> str:
        return f"MGDA(epsilon={self.epsilon}, max_iters={self.max_iters})"
