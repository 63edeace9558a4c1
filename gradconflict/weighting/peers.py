"""The methods TorchJD implements, run on the monitor's exact Gram: UPGrad, DualProj, CAGrad, IMTL-G, Aligned-MTL,
and any TorchJD weighting or aggregator a user passes.

TorchJD (https://torchjd.org, 0.18) maps a Gramian to weights, which is exactly what a measured step has; these
classes only adapt its interface (task names, float64 on the host, solver failures as :class:`WeightingError`).
They need the optional extra: ``pip install 'gradconflict[weighting]'`` (TorchJD with quadprog and cvxpy).

>>> import torch
>>> IMTLG()(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), {"a": 0.0, "b": 0.0})  # equal projections: 1/n_i, normalised
tensor([0.6667, 0.3333], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor

from gradconflict.weighting.base import Weighting, WeightingError

__all__ = ["IMTLG", "AlignedMTL", "CAGrad", "DualProj", "TorchJDWeighting", "UPGrad", "gram_factor", "torchjd"]

INSTALL = "pip install 'gradconflict[weighting]'"


def torchjd(method: str) -> ModuleType:
    """``torchjd.aggregation``, or an ``ImportError`` saying that ``method`` needs the extra.

    >>> torchjd("UPGrad").UPGradWeighting.__name__
    'UPGradWeighting'
    """
    try:
        import torchjd.aggregation as aggregation
    except ImportError as err:
        raise ImportError(
            f"{method} runs TorchJD's implementation, which is not installed: {INSTALL}. MGDA and PCGrad work "
            "without it"
        ) from err
    return aggregation


def gram_factor(gram: Tensor) -> Tensor:
    """A T x T matrix ``M`` with ``M M^T = G``: what a weighting of the Jacobian needs when it only depends on the
    Jacobian through its Gramian (the clipped square root of the eigenvalues; ``G`` is PSD up to rounding).

    >>> G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> M = gram_factor(G)
    >>> torch.allclose(M @ M.T, G)
    True
    """
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0).sqrt()


class TorchJDWeighting(Weighting):
    """A TorchJD ``Weighting`` (or an aggregator built on one) applied to this step's exact Gram.

    A weighting of the Gramian gets the Gram; a weighting of the matrix (TorchJD's ``NashMTL`` aggregator,
    ``MeanWeighting``, ...) gets a T x T factor ``M`` with ``M M^T = G`` (:func:`gram_factor`), which gives the same
    weights as the Jacobian for every weighting that depends on it only through its Gramian, as TorchJD's do. The
    object's own state, if any, stays with it (save it yourself); the losses are not used.

    Args:
        weighting: a ``torchjd.aggregation.Weighting``, ``GramianWeightedAggregator`` or ``WeightedAggregator``.
        name: the name shown in reports (default: the class name, lower case).

    >>> from torchjd.aggregation import MeanWeighting
    >>> TorchJDWeighting(MeanWeighting())(torch.eye(2), {"a": 0.0, "b": 0.0})
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, weighting: Any, name: str | None = None) -> None:
        aggregation = torchjd(type(weighting).__name__)
        if isinstance(weighting, aggregation.GramianWeightedAggregator):
            weighting = weighting.gramian_weighting
        elif isinstance(weighting, aggregation.WeightedAggregator):
            weighting = weighting.weighting
        if not isinstance(weighting, aggregation.Weighting):
            raise TypeError(
                f"{type(weighting).__name__} is not a TorchJD Weighting or weighted aggregator; pass e.g. "
                "torchjd.aggregation.UPGradWeighting() or UPGrad()"
            )
        self.torchjd = weighting
        self.name = name or type(weighting).__name__.lower()
        # TorchJD marks the weightings of the matrix (not of its Gramian) by this base class.
        of_matrix = getattr(getattr(aggregation, "_weighting_bases", None), "_MatrixWeighting", ())
        self._of_matrix = isinstance(weighting, of_matrix)

    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> Tensor:
        with torch.no_grad():
            return self.torchjd(gram_factor(gram) if self._of_matrix else gram)

    def __repr__(self) -> str:
        return f"TorchJDWeighting({self.torchjd!r})"


class _Solved(TorchJDWeighting):
    """A built-in TorchJD-backed method: a solver failure becomes a :class:`WeightingError` (the monitor keeps the
    last weights), and an optional preference over tasks is given by name."""

    def __init__(self, weighting: Any, name: str, preference: Mapping[str, float] | None = None) -> None:
        super().__init__(weighting, name)
        self.preference = None if preference is None else {str(k): float(v) for k, v in preference.items()}

    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> Tensor:
        if self.preference is not None:
            missing = [t for t in losses if t not in self.preference]
            if missing:
                raise ValueError(f"{self.name}: the preference gives no weight to task(s) {missing}")
            self.torchjd.pref_vector = torch.tensor([self.preference[t] for t in losses], dtype=torch.float64)
        try:
            return super().weights(gram, losses)
        except (ValueError, TypeError, ArithmeticError, RuntimeError) as err:
            raise WeightingError(f"{self.name} failed on this step's Gram: {type(err).__name__}: {err}") from err

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torchjd!r})"


class UPGrad(_Solved):
    """UPGrad: each task gradient projected onto the dual cone of all of them, then averaged.

    Source: P. Quinton and V. Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
    (arXiv:2406.16232), run by TorchJD's ``UPGradWeighting`` (quadprog). The update ``(1/T) sum_i pi(g_i)``, where
    ``pi`` projects onto the cone ``{x : <x, g_j> >= 0 for all j}``, never conflicts with any task (every task's
    loss falls to first order), keeps each task's own contribution, and equals the mean gradient when no pair
    conflicts. The Gram is normalised by its trace and regularised by ``1e-4 I`` before solving (TorchJD's
    defaults).

    Args:
        preference: task -> weight replacing the mean's ``1/T`` (TorchJD's ``pref_vector``, by name).

    >>> import torch
    >>> UPGrad()(torch.tensor([[1.0, 0.5], [0.5, 1.0]]), {"a": 0.0, "b": 0.0})   # no conflict: the mean
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, preference: Mapping[str, float] | None = None) -> None:
        super().__init__(torchjd("UPGrad").UPGradWeighting(), "upgrad", preference)


class DualProj(_Solved):
    """DualProj: the mean gradient projected onto the dual cone of the task gradients.

    Source: the projection of D. Lopez-Paz and M. Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017 (Eq. 11), applied to the mean as in Quinton and Rey (arXiv:2406.16232); run by TorchJD's
    ``DualProjWeighting`` (quadprog, trace-normalised Gram regularised by ``1e-4 I``). The update is the point of
    the cone ``{x : <x, g_j> >= 0 for all j}`` closest to the mean gradient: no task's loss rises to first order.

    Args:
        preference: task -> weight replacing the mean's ``1/T`` (TorchJD's ``pref_vector``, by name).

    >>> import torch
    >>> DualProj()(torch.tensor([[1.0, 0.5], [0.5, 1.0]]), {"a": 0.0, "b": 0.0})  # no conflict: the mean
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, preference: Mapping[str, float] | None = None) -> None:
        super().__init__(torchjd("DualProj").DualProjWeighting(), "dualproj", preference)


class CAGrad(_Solved):
    """CAGrad: the update that maximises the worst task's first-order improvement within a ball around the mean
    gradient.

    Source: B. Liu, X. Liu, X. Jin, P. Stone and Q. Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021, Algorithm 1: with ``g_0`` the mean gradient, solve the dual
    ``min_{w in simplex} g_w^T g_0 + sqrt(phi) |g_w|`` with ``sqrt(phi) = c |g_0|``, then update along
    ``d = g_0 + sqrt(phi) / |g_w| g_w``. Run by TorchJD's ``CAGradWeighting`` (cvxpy, Clarabel). ``c = 0`` gives the
    mean gradient; larger ``c`` moves towards MGDA's direction. The authors' training code divides the update by
    ``1 + c^2`` and multiplies it by ``T`` (their ``rescale=1``); this is the paper's ``d``, so scale the learning
    rate accordingly.

    Args:
        c: the radius of the ball, relative to ``|g_0|``; 0.4 is the authors' value on NYU-v2 and Cityscapes.
        norm_eps: below this update norm the point counts as Pareto-stationary (weights 0), TorchJD's default.

    >>> import torch
    >>> CAGrad(c=0.0)(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), {"a": 0.0, "b": 0.0})  # c = 0: the mean
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, c: float = 0.4, norm_eps: float = 1e-4) -> None:
        if not c >= 0:
            raise ValueError(f"c must be >= 0, got {c!r}")
        super().__init__(torchjd("CAGrad").CAGradWeighting(c=float(c), norm_eps=float(norm_eps)), "cagrad")
        self.c = float(c)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c})"


class IMTLG(_Solved):
    """IMTL-G: the update whose projections on every task's unit gradient are equal.

    Source: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao and W. Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021 (the gradient part, IMTL-G), in the form of Quinton and Rey
    (arXiv:2406.16232) that also accepts linearly dependent gradients: ``w = G^+ n / sum(G^+ n)`` with ``n_i =
    |g_i|``; weights 0 when that sum vanishes. Run by TorchJD's ``IMTLGWeighting``. The weights sum to 1 and may be
    negative; every task gets the same first-order improvement rate per unit of its own gradient's norm.

    >>> import torch
    >>> IMTLG()(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), {"a": 0.0, "b": 0.0})  # opposite: no update
    tensor([0., 0.], dtype=torch.float64)
    """

    def __init__(self) -> None:
        super().__init__(torchjd("IMTL-G").IMTLGWeighting(), "imtl-g")


class AlignedMTL(_Solved):
    """Aligned-MTL: the gradients' principal components rescaled to equal size (condition number 1), then
    averaged.

    Source: D. Senushkin, N. Patakin, A. Kuznetsov and A. Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023, Algorithm 1: with ``G = V diag(lambda) V^T`` (the eigenvalues above
    rounding), the balance transformation ``B = sqrt(s) V diag(lambda)^(-1/2) V^T`` and weights ``B w_0``, where
    ``w_0`` is the mean's ``1/T`` (or ``preference``) and ``s`` the smallest kept eigenvalue (``scale_mode="min"``,
    the paper's choice; ``"median"``, or ``"rmse"``, the mean eigenvalue, as in the authors' code). Run by
    TorchJD's ``AlignedMTLWeighting``. The weights may be negative.

    Args:
        preference: task -> weight replacing ``1/T`` (TorchJD's ``pref_vector``, by name).
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

    >>> import torch
    >>> AlignedMTL()(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), {"a": 0.0, "b": 0.0})   # orthogonal: equal norms
    tensor([0.2500, 0.5000], dtype=torch.float64)
    """

    def __init__(
        self, preference: Mapping[str, float] | None = None, scale_mode: Literal["min", "median", "rmse"] = "min"
    ) -> None:
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        weighting = torchjd("Aligned-MTL").AlignedMTLWeighting(scale_mode=scale_mode)
        super().__init__(weighting, "aligned-mtl", preference)
