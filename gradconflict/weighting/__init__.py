"""Conflict-aware updates from the exact Gram: ``monitor.backward(losses, weighting="upgrad")``.

Every well-known method for combining conflicting task gradients (MGDA, PCGrad, CAGrad, IMTL-G, Aligned-MTL,
Nash-MTL, UPGrad, DualProj) updates the shared parameters along ``sum_i lambda_i g_i`` with weights ``lambda``
that are a function of the Gram ``G_ij = <g_i, g_j>`` of the task gradients, which a measured step already has,
exactly. So a weighted step costs a measured step plus solving a T-variable problem: no per-task gradient copy.

- :data:`METHODS` by name, or a :class:`Weighting`, a ``(gram, losses) -> weights`` function, or a TorchJD
  ``Weighting`` (:class:`TorchJDWeighting`). MGDA (solved exactly; ``"mgda-fw"``: TorchJD's Frank-Wolfe) and
  PCGrad are native; the others run TorchJD's
  implementations (``pip install 'gradconflict[weighting]'``).
- ``.grad`` comes from one ordinary backward (:func:`~gradconflict.weighting.routing.weighted_backward`): the
  shared parameters get ``sum_i lambda_i w_i g_i``, each task's own parameters (its head) the gradient of its
  own loss ``w_i L_i``, as in TorchJD's ``mtl_backward`` and the methods' reference code.
- With ``every=k``, the unmeasured steps reuse the last measured step's weights.

>>> import torch, torch.nn as nn
>>> from gradconflict import ConflictMonitor
>>> torch.manual_seed(0) and None
>>> backbone, heads = nn.Linear(4, 8), nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
>>> monitor = ConflictMonitor(nn.ModuleDict({"backbone": backbone, "heads": heads}))
>>> h = backbone(torch.randn(16, 4))
>>> report = monitor.backward({"a": heads["a"](h).mean(), "b": -heads["b"](h).mean()}, weighting="mgda")
>>> float(report.weights.sum())                       # MGDA's weights lie on the simplex
1.0
>>> monitor.close()
"""

from __future__ import annotations

from gradconflict.weighting.base import FunctionWeighting, Weighting, WeightingError, WeightingFn, WeightingWarning
from gradconflict.weighting.mgda import MGDA, MGDAFrankWolfe
from gradconflict.weighting.nash import NashMTL
from gradconflict.weighting.pcgrad import PCGrad
from gradconflict.weighting.peers import IMTLG, AlignedMTL, CAGrad, DualProj, TorchJDWeighting, UPGrad
from gradconflict.weighting.registry import METHODS, WeightingSpec, make_weighting
from gradconflict.weighting.routing import weighted_backward
from gradconflict.weighting.schedule import StepWeights

__all__ = [
    "IMTLG",
    "MGDA",
    "METHODS",
    "MGDAFrankWolfe",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "FunctionWeighting",
    "NashMTL",
    "PCGrad",
    "StepWeights",
    "TorchJDWeighting",
    "UPGrad",
    "Weighting",
    "WeightingError",
    "WeightingFn",
    "WeightingSpec",
    "WeightingWarning",
    "make_weighting",
    "weighted_backward",
]
