"""Inter-task affinity: how a step on task ``i`` changes task ``j``'s loss.

First order, from the Grams already measured: TAG's transference ``Z_ij = lr G_ij / L_j``
(:func:`gradconflict.metrics.transference`), averaged over the measured steps. Exact, on request: the lookahead
of TAG, taking one SGD step on task ``i`` alone and re-evaluating every task's loss on the same batch,
``Z_ij = 1 - L_j(after) / L_j(before)``, with the parameters restored afterwards.

:func:`normalized` divides each column by the task's own self-affinity ``Z_jj``: ``N_ij = Z_ij / Z_jj`` is how
much a step on ``i`` lowers ``L_j`` compared with a step on ``j`` itself; ``lr`` and the loss scale cancel.

Rows and columns follow the sorted task names (:mod:`~gradconflict.diagnosis.aligned`), whatever order the
steps listed them in; each entry is averaged over the steps that carried both tasks (NaN when none did).

>>> import torch
>>> from gradconflict import ConflictReport
>>> G = torch.tensor([[1.0, -0.5], [-0.5, 2.0]])
>>> r = ConflictReport("ab", G, losses=torch.tensor([1.0, 4.0]))
>>> mean_transference([r], lr=0.1).round(decimals=4).tolist()
[[0.1, -0.0125], [-0.05, 0.05]]
>>> normalized(mean_transference([r])).round(decimals=4).tolist()
[[1.0, -0.25], [-0.5, 1.0]]
>>> only_a = ConflictReport("a", torch.tensor([[3.0]]), losses=torch.tensor([1.0]))   # a step carrying a alone
>>> mean_transference([r, only_a]).round(decimals=4).tolist()                        # Z_aa over both steps
[[2.0, -0.125], [-0.5, 0.5]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from gradconflict.diagnosis.aligned import Run, align, masked_mean

__all__ = ["lookahead_transference", "mean_transference", "normalized"]

LossClosure = Callable[[], Mapping[str, Tensor]]


def mean_transference(history: Run, lr: float = 1.0) -> np.ndarray:
    """Mean of the first-order transference ``lr G_ij / L_j`` (T x T, tasks in sorted order), each entry over
    the measured steps that carried both tasks (the diagonal: that carried the task); NaN for a pair never
    measured together.

    A report saved without losses counts with ``L_j = 1`` for every task; a step whose loss is not finite
    does not count.
    """
    aligned = align(history)
    if not aligned.num_steps:
        raise ValueError("the history has no measured step: no affinity to compute")
    Z = aligned.transference(lr)
    both = aligned.present[:, :, None] & aligned.present[:, None, :]
    return masked_mean(Z, both & np.isfinite(Z))


def normalized(Z: np.ndarray) -> np.ndarray:
    """``N_ij = Z_ij / Z_jj``; a column whose self-affinity is not positive is left unscaled (NaN stays NaN)."""
    d = np.diagonal(Z).copy()
    return Z / np.where(d > 0, d, 1.0)[None, :]


def lookahead_transference(
    model: nn.Module, losses: LossClosure, lr: float, params: Iterable[nn.Parameter] | None = None
) -> tuple[list[str], np.ndarray]:
    """TAG's exact lookahead transference on one batch: ``Z_ij = 1 - L_j(after step on i) / L_j(before)``.

    Args:
        model: the model; its parameters are restored exactly after each lookahead step.
        losses: a closure that runs the model on one fixed batch and returns ``{task: scalar loss}``.
        lr: the SGD step size of the lookahead.
        params: the parameters to step (default: every parameter of ``model`` that requires grad).

    Returns ``(tasks, Z)``.
    """
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    before = losses()
    tasks = list(before)
    L0 = torch.stack([before[t].detach().reshape(()) for t in tasks]).double()
    Z = np.zeros((len(tasks), len(tasks)))
    for i, task in enumerate(tasks):
        current = before if i == 0 else losses()
        grads = torch.autograd.grad(current[task], params, allow_unused=True)
        try:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.sub_(lr * g)
                after = losses()
                L1 = torch.stack([after[t].detach().reshape(()) for t in tasks]).double()
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        Z[i] = (1 - L1 / L0.where(L0 != 0, torch.ones_like(L0))).cpu().numpy()
    return tasks, Z
