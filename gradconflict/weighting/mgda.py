"""MGDA: the minimum-norm point of the convex hull of the task gradients (native: works without TorchJD).

:class:`MGDA` solves it exactly (Wolfe's active-set algorithm on the Gram); :class:`MGDAFrankWolfe` is TorchJD's
and the paper's Frank-Wolfe iteration, stopped at a step below ``epsilon``, for runs that must match TorchJD.

>>> import torch
>>> MGDA()(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), {"a": 1.0, "b": 1.0})   # opposite tasks: no update
tensor([0.5000, 0.5000], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import Tensor

from gradconflict.weighting.base import Weighting

__all__ = ["MGDA", "MGDAFrankWolfe", "min_norm_weights"]

#: Relative tolerance of the optimality test ``min_i (G alpha)_i >= alpha^T G alpha`` (scaled by ``max_i G_ii``).
TOLERANCE = 1e-12


def _affine_minimiser(G: np.ndarray) -> np.ndarray:
    """``beta`` minimising ``beta^T G beta`` subject to ``sum(beta) = 1`` (no sign constraint): the KKT system
    ``[[G, 1], [1^T, 0]] [beta; -nu] = [0; 1]``, by least squares where the points are affinely dependent."""
    n = len(G)
    kkt = np.block([[G, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    rhs = np.r_[np.zeros(n), 1.0]
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]


def min_norm_weights(G: np.ndarray, tolerance: float = TOLERANCE, max_iters: int = 1000) -> np.ndarray:
    """The weights ``alpha`` on the simplex minimising ``alpha^T G alpha``, for a PSD Gram ``G``.

    Wolfe's minimum-norm-point algorithm (P. Wolfe, "Finding the nearest point in a polytope", Mathematical
    Programming 11, 1976), written on the Gram: a set ``S`` of tasks (the corral) and ``alpha`` supported on it;
    each major cycle adds the task ``j`` with the smallest ``(G alpha)_j`` while ``(G alpha)_j < alpha^T G alpha``
    (the optimality condition fails); each minor cycle moves ``alpha`` towards the affine minimiser over ``S`` and
    drops the tasks whose weight reaches 0 on the way. It ends in finitely many steps at the exact optimum (up to
    rounding), where every task has ``(G alpha)_i >= alpha^T G alpha``: the update ``sum_i alpha_i g_i`` lowers
    every task's loss to first order (or is 0, Pareto-stationary).

    >>> min_norm_weights(np.array([[1.0, 0.0], [0.0, 4.0]]))   # orthogonal: 1/n_i^2, normalised
    array([0.8, 0.2])
    """
    T = len(G)
    scale = max(float(np.max(np.diag(G))), 0.0)
    if T == 1 or scale == 0.0:
        return np.full(T, 1.0 / T)
    tol = tolerance * scale
    corral = [int(np.argmin(np.diag(G)))]
    alpha = np.zeros(T)
    alpha[corral[0]] = 1.0
    for _ in range(max_iters):
        Galpha = G @ alpha
        j = int(np.argmin(Galpha))
        if Galpha[j] >= alpha @ Galpha - tol or j in corral:
            break
        corral.append(j)
        while True:  # minor cycles: until the affine minimiser over the corral is inside the simplex
            idx = np.array(corral)
            beta = _affine_minimiser(G[np.ix_(idx, idx)])
            if np.all(beta > 0):
                alpha = np.zeros(T)
                alpha[idx] = beta
                break
            current = alpha[idx]  # positive, but for the task just added (0)
            ratios = np.where(beta <= 0, current / np.maximum(current - beta, 1e-300), np.inf)
            k = int(np.argmin(ratios))  # the first task whose weight reaches 0 on the way to beta
            step = current + ratios[k] * (beta - current)
            step[k] = 0.0
            keep = step > 0
            alpha = np.zeros(T)
            alpha[idx[keep]] = step[keep]
            alpha /= alpha.sum()
            corral = [int(i) for i in idx[keep]]
            if idx[k] == j:  # rounding: the task just added gets no weight; nothing better is found
                return alpha
    return alpha


class MGDA(Weighting):
    """Multiple-gradient descent: the weights ``alpha`` on the simplex that minimise ``||sum_i alpha_i g_i||^2 =
    alpha^T G alpha``, solved exactly (:func:`min_norm_weights`).

    Source: J.-A. Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
    Comptes Rendus Mathématique 350 (2012); O. Sener and V. Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018.

    The update is the common descent direction of largest guaranteed decrease: every task's loss falls to first
    order, or the update is 0 when the tasks are Pareto-stationary (some convex combination of their gradients
    vanishes: exactly opposite tasks, a task with a zero gradient). The weights sum to 1, so the update is a
    convex combination, never longer than the shortest task gradient. Where several ``alpha`` give the same
    min-norm point (affinely dependent gradients), one of them is returned.

    >>> import torch
    >>> MGDA()(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), {"a": 0.0, "b": 0.0})  # orthogonal: 1/n_i^2, normalised
    tensor([0.8000, 0.2000], dtype=torch.float64)
    """

    name = "mgda"

    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> np.ndarray:
        return min_norm_weights(gram.numpy())

    def __repr__(self) -> str:
        return "MGDA()"


class MGDAFrankWolfe(Weighting):
    """MGDA as TorchJD (0.18) and the paper's code solve it: Frank-Wolfe from ``alpha = 1/T``, stopped early.

    Sener and Koltun's Algorithm 2: each step goes towards the vertex ``e_t`` with ``t = argmin_r (G alpha)_r``,
    with the exact line search of their Algorithm 1, until the step size ``gamma`` falls below ``epsilon`` or after
    ``max_iters`` steps. With the defaults the weights can be far (0.28 seen) from the min-norm point, and the
    update can raise a task's loss to first order; use it to reproduce TorchJD's MGDA, :class:`MGDA` otherwise.

    Args:
        epsilon: stop when the Frank-Wolfe step ``gamma`` is below this (TorchJD's default, 1e-3).
        max_iters: most Frank-Wolfe steps (TorchJD's default, 100).

    >>> import torch
    >>> MGDAFrankWolfe()(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), {"a": 0.0, "b": 0.0})
    tensor([0.8000, 0.2000], dtype=torch.float64)
    """

    name = "mgda-fw"

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
        return f"MGDAFrankWolfe(epsilon={self.epsilon}, max_iters={self.max_iters})"
