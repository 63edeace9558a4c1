"""Conflict metrics: pure functions of the task-gradient Gram matrix ``G``.

``G[i, j] = <g_i, g_j>`` where ``g_i`` is task ``i``'s gradient over the shared parameters. Every quantity
the library reports is a function of ``G`` (and of the task weights ``w``), so each one is defined here once,
on tensors, with no model in sight (the math and its sources are in the docs). All functions keep the result on
``G``'s device and never force a host sync. Each accepts a batch of Grams ``[..., T, T]`` (with weights
``[..., T]``) as well as a single one, so that a run's steps are computed at once.

A zero-norm task (a task whose gradient vanishes) never produces a NaN: its cosines and alignment are 0 and
:func:`zero_norm_tasks` flags it.

>>> import torch
>>> G = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])      # two opposite gradients
>>> cosine(G)
tensor([[ 1., -1.],
        [-1.,  1.]])
>>> conflict_fraction(G).item(), cancellation(G).item()
(1.0, 1.0)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "CONFLICT_COSINE",
    "alignment",
    "cancellation",
    "condition_number",
    "conflict_fraction",
    "conflict_pairs",
    "cosine",
    "loss_change",
    "magnitude_similarity",
    "task_norms",
    "transference",
    "update_norm",
    "worst_cosine",
    "zero_norm_tasks",
]


#: The cosine below which two task gradients conflict by default (``S``): PCGrad's (Yu et al., 2020), a negative
#: cosine. The monitor, the reports and the diagnosis all default to it.
CONFLICT_COSINE = 0.0


def _tiny(G: Tensor) -> float:
    # Norms below this are treated as exactly zero: relative to the largest diagonal entry, so that the test is
    # scale-free, and never below the dtype's smallest normal number.
    return float(torch.finfo(G.dtype).tiny)


def _weights(G: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return torch.ones(G.shape[:-1], dtype=G.dtype, device=G.device)
    return weights.to(dtype=G.dtype, device=G.device)


def _outer(a: Tensor, b: Tensor) -> Tensor:
    """``a_i b_j`` over the last axis, batched over the leading ones."""
    return a[..., :, None] * b[..., None, :]


def task_norms(G: Tensor) -> Tensor:
    """Gradient norm of each task, ``n_i = sqrt(G_ii)``.

    >>> task_norms(torch.diag(torch.tensor([4.0, 9.0])))
    tensor([2., 3.])
    """
    return G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def zero_norm_tasks(G: Tensor, rtol: float = 1e-12) -> Tensor:
    """Boolean mask of tasks whose gradient is (numerically) zero: ``G_ii <= rtol * max_k G_kk``.

    >>> zero_norm_tasks(torch.diag(torch.tensor([1.0, 0.0])))
    tensor([False,  True])
    """
    d = G.diagonal(dim1=-2, dim2=-1)
    return d <= (rtol * d.amax(-1, keepdim=True)).clamp_min(_tiny(G))


def cosine(G: Tensor) -> Tensor:
    """Pairwise cosine ``C_ij = G_ij / (n_i n_j)``; rows and columns of zero-norm tasks are 0.

    >>> cosine(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    tensor([[1., 0.],
            [0., 1.]])
    """
    n = task_norms(G)
    live = ~zero_norm_tasks(G)
    denom = _outer(n, n)
    C = torch.where(_outer(live, live), G / denom.where(denom > 0, torch.ones_like(denom)), 0)
    return C.clamp(-1.0, 1.0)


def conflict_pairs(G: Tensor, threshold: float = CONFLICT_COSINE) -> Tensor:
    """Upper-triangular mask of conflicting pairs, ``C_ij < threshold`` for ``i < j``.

    Pairs involving a zero-norm task never conflict.

    >>> conflict_pairs(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    tensor([[False,  True],
            [False, False]])
    """
    k = torch.arange(G.shape[-1], device=G.device)
    upper = k[:, None] < k[None, :]  # not .triu(1): on CPU, torch 2.13's triu costs milliseconds on 2 threads
    live = ~zero_norm_tasks(G)
    return (cosine(G) < threshold) & upper & _outer(live, live)


def conflict_fraction(G: Tensor, threshold: float = CONFLICT_COSINE) -> Tensor:
    """Share of task pairs that conflict: ``#{i<j: C_ij < threshold} / (T(T-1)/2)``.

    NaN when ``T = 1``: with a single task there is no pair, and "no conflict" would be a claim nobody measured.

    >>> conflict_fraction(torch.eye(3)).item()
    0.0
    >>> conflict_fraction(torch.eye(1)).isnan().item()
    True
    """
    T = G.shape[-1]
    if T < 2:
        return torch.full(G.shape[:-2], float("nan"), dtype=G.dtype, device=G.device)
    return conflict_pairs(G, threshold).sum((-2, -1)).to(G.dtype) / (T * (T - 1) // 2)


def worst_cosine(G: Tensor, carried: Tensor | None = None) -> Tensor:
    """The worst pair cosine: the most negative ``C_ij`` over the pairs ``i < j`` (of the tasks ``carried``, a
    ``[..., T]`` mask, when given: a step that lacked some tasks). NaN where there is no pair (fewer than two
    tasks): with a single task there is nothing to compare.

    >>> worst_cosine(torch.tensor([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])).item()
    -0.5
    >>> worst_cosine(torch.eye(1)).isnan().item()
    True
    """
    T = G.shape[-1]
    k = torch.arange(T, device=G.device)
    pairs = k[:, None] < k[None, :]
    if carried is not None:
        pairs = pairs & _outer(carried, carried)
    pairs = pairs.expand(G.shape)
    worst = torch.where(pairs, cosine(G), torch.inf).amin((-2, -1))
    return torch.where(pairs.any(-1).any(-1), worst, torch.nan)


def magnitude_similarity(G: Tensor) -> Tensor:
    """Gradient magnitude similarity ``GMS_ij = 2 n_i n_j / (n_i^2 + n_j^2)`` (1 when both norms are 0).

    >>> round(magnitude_similarity(torch.diag(torch.tensor([1.0, 4.0])))[0, 1].item(), 6)
    0.8
    """
    n = task_norms(G)
    sq = n.square()
    denom = sq[..., :, None] + sq[..., None, :]
    return torch.where(denom > 0, 2 * _outer(n, n) / denom.where(denom > 0, torch.ones_like(denom)), 1.0)


def update_norm(G: Tensor, weights: Tensor | None = None) -> Tensor:
    """Norm of the combined update ``g = sum_i w_i g_i``: ``sqrt(w^T G w)``.

    >>> update_norm(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])).item()
    0.0
    """
    w = _weights(G, weights)
    return torch.einsum("...i,...ij,...j->...", w, G, w).clamp_min(0).sqrt()


def cancellation(G: Tensor, weights: Tensor | None = None) -> Tensor:
    """Magnitude cancellation ``1 - sqrt(w^T G w) / sum_i w_i n_i`` in [0, 1] (0 when every norm is 0).

    The share of the tasks' gradient magnitude that is lost because they point in different directions.

    >>> cancellation(torch.ones(2, 2)).item()      # identical gradients lose nothing
    0.0
    """
    w = _weights(G, weights)
    total = (w * task_norms(G)).sum(-1)
    ratio = update_norm(G, w) / total.where(total > 0, torch.ones_like(total))
    return torch.where(total > 0, (1 - ratio).clamp(0.0, 1.0), 0.0)


def alignment(G: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cosine of each task gradient with the combined update: ``a_i = (G w)_i / (n_i sqrt(w^T G w))``.

    ``a_i < 0`` means the step raises task ``i``'s loss (to first order). 0 for a zero-norm task or update.

    >>> alignment(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), torch.tensor([1.0, 0.0]))
    tensor([1., 0.])
    """
    w = _weights(G, weights)
    n = task_norms(G)
    u = update_norm(G, w)
    denom = n * u[..., None]
    ok = (denom > 0) & ~zero_norm_tasks(G)
    Gw = (G @ w[..., None]).squeeze(-1)
    return torch.where(ok, Gw / denom.where(denom > 0, torch.ones_like(denom)), 0.0).clamp(-1.0, 1.0)


def condition_number(G: Tensor, rtol: float = 1e-12) -> Tensor:
    """Condition number of the task-gradient matrix, ``sqrt(lambda_max(G) / lambda_min(G))``.

    ``inf`` when the gradients are linearly dependent (``lambda_min <= rtol * lambda_max``); 1 for ``T = 1``.

    >>> condition_number(torch.diag(torch.tensor([4.0, 1.0]))).item()
    2.0
    """
    eig = torch.linalg.eigvalsh(G.double() if G.dtype != torch.float64 else G)
    lo, hi = eig[..., 0], eig[..., -1]
    singular = lo <= rtol * hi.clamp_min(0)
    kappa = (hi / lo.where(~singular, torch.ones_like(lo))).clamp_min(1).sqrt()
    return torch.where(singular, torch.inf, kappa).to(G.dtype)


def loss_change(G: Tensor, weights: Tensor | None = None, lr: float = 1.0) -> Tensor:
    """First-order change of each task's loss after an SGD step on the weighted sum: ``-lr (G w)``.

    >>> loss_change(torch.tensor([[1.0, -2.0], [-2.0, 4.0]]), lr=0.1)
    tensor([ 0.1000, -0.2000])
    """
    return -lr * (G @ _weights(G, weights)[..., None]).squeeze(-1)


def transference(G: Tensor, losses: Tensor, lr: float = 1.0) -> Tensor:
    """First-order inter-task affinity (TAG's transference): ``Z_ij = lr G_ij / L_j``.

    ``Z_ij`` is the relative decrease of task ``j``'s loss after one SGD step on task ``i`` alone; a negative
    entry means the step on ``i`` hurts ``j``.

    >>> transference(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), torch.tensor([2.0, 4.0]), lr=0.5)
    tensor([[ 0.2500, -0.1250],
            [-0.2500,  0.1250]])
    """
    L = losses.to(dtype=G.dtype, device=G.device)
    return lr * G / L.where(L != 0, torch.ones_like(L))[..., None, :]
