"""The independent references: TorchJD 0.18's aggregators on explicit Jacobians, and the random Jacobians they are
checked on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

aggregation = pytest.importorskip("torchjd.aggregation")

def min_norm_qp(gramian: Tensor) -> Tensor:
    """The exact MGDA weights by an independent solver: quadprog on ``min a^T G a`` over the simplex (a ridge of
    1e-13 of the trace makes the problem strictly convex, as quadprog needs; the update moves by far less than the
    tests' tolerance)."""
    import numpy as np
    import quadprog

    G = gramian.detach().double().cpu().numpy()
    T = len(G)
    P = G + 1e-13 * max(np.trace(G), 1e-300) * np.eye(T)
    constraints = np.hstack([np.ones((T, 1)), np.eye(T)])
    alpha = quadprog.solve_qp(P, np.zeros(T), constraints, np.r_[1.0, np.zeros(T)], meq=1)[0]
    return torch.as_tensor(alpha, dtype=gramian.dtype, device=gramian.device)


class MinNormQPWeighting(aggregation.MGDAWeighting):
    """TorchJD's MGDA weighting with its Frank-Wolfe loop replaced by the exact QP (:func:`min_norm_qp`)."""

    def forward(self, gramian: Tensor, /) -> Tensor:
        return min_norm_qp(gramian)


#: method name -> TorchJD aggregator for T tasks, with the parameters our named method uses ("mgda": TorchJD's
#: aggregator with the exact min-norm QP; "mgda-fw": TorchJD's own Frank-Wolfe MGDA)
AGGREGATORS: dict[str, Callable[[int], object]] = {
    "upgrad": lambda T: aggregation.UPGrad(),
    "mgda": lambda T: aggregation.GramianWeightedAggregator(MinNormQPWeighting()),
    "mgda-fw": lambda T: aggregation.MGDA(),
    "cagrad": lambda T: aggregation.CAGrad(c=0.4),
    "pcgrad": lambda T: aggregation.PCGrad(),
    "imtl-g": lambda T: aggregation.IMTLG(),
    "aligned-mtl": lambda T: aggregation.AlignedMTL(),
    "nash-mtl": lambda T: aggregation.NashMTL(n_tasks=T),
    "dualproj": lambda T: aggregation.DualProj(),
}

#: PCGrad draws its task orders from torch's global generator in TorchJD, from its own one (seed 0) here
PCGRAD_SEED = 0


def jacobian(kind: str, T: int, n: int = 30, seed: int = 0) -> Tensor:
    """A float64 T x n Jacobian: ``random``, ``dependent`` (rank 2 < T), ``conflicting`` (rows along one direction
    with alternating signs, plus noise) or ``scaled`` (random rows of norms spanning four decades)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(T, n, generator=g, dtype=torch.float64)
    if kind == "dependent":
        return torch.randn(T, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64)
    if kind == "conflicting":
        u = torch.randn(n, generator=g, dtype=torch.float64)
        signs = torch.tensor([(-1.0) ** i for i in range(T)], dtype=torch.float64)
        return signs[:, None] * u + 0.3 * torch.randn(T, n, generator=g, dtype=torch.float64)
    if kind == "scaled":
        scales = torch.logspace(-2, 2, T, dtype=torch.float64)
        return scales[:, None] * torch.randn(T, n, generator=g, dtype=torch.float64)
    raise ValueError(kind)


def no_common_descent(J: Tensor) -> bool:
    """Oracle (scipy's NNLS, independent of the library): whether some convex combination of the rows of ``J``
    vanishes, i.e. ``min |J^T a|`` over the simplex is 0 (to 1e-8 of the rows' scale)."""
    import numpy as np
    from scipy.optimize import nnls

    rho = 1e3 * float(J.norm(dim=1).max())
    A = np.vstack([J.T.numpy(), rho * np.ones((1, len(J)))])
    b = np.r_[np.zeros(J.shape[1]), rho]
    _, residual = nnls(A, b)
    return residual <= 1e-8 * rho


def relative_error(a: Tensor, b: Tensor, floor: float = 1e-300) -> float:
    """``|a - b| / |b|``; ``floor`` bounds the denominator below (an update that is 0 up to rounding)."""
    return float((a - b).norm() / b.norm().clamp_min(floor))
