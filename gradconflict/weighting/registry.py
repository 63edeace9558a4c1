"""The methods by name, and a :class:`~gradconflict.weighting.Weighting` from whatever a user passes as
``weighting=``: a name, a weighting, a ``(gram, losses) -> weights`` function, or a TorchJD weighting.

>>> make_weighting("MGDA"), make_weighting("mgda-fw"), make_weighting("pcgrad")
(MGDA(), MGDAFrankWolfe(epsilon=0.001, max_iters=100), PCGrad(seed=0))
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from gradconflict.weighting.base import FunctionWeighting, Weighting, WeightingFn
from gradconflict.weighting.mgda import MGDA, MGDAFrankWolfe
from gradconflict.weighting.nash import NashMTL
from gradconflict.weighting.pcgrad import PCGrad
from gradconflict.weighting.peers import IMTLG, AlignedMTL, CAGrad, DualProj, TorchJDWeighting, UPGrad

__all__ = ["METHODS", "WeightingSpec", "make_weighting"]

#: The methods known by name (each with its defaults); MGDA (both solvers) and PCGrad work without the
#: ``weighting`` extra. ``"mgda"`` is the exact min-norm point, ``"mgda-fw"`` TorchJD's Frank-Wolfe iteration.
METHODS: dict[str, Callable[[], Weighting]] = {
    "upgrad": UPGrad,
    "mgda": MGDA,
    "mgda-fw": MGDAFrankWolfe,
    "cagrad": CAGrad,
    "pcgrad": PCGrad,
    "imtl-g": IMTLG,
    "aligned-mtl": AlignedMTL,
    "nash-mtl": NashMTL,
    "dualproj": DualProj,
}

#: What ``weighting=`` accepts (a TorchJD weighting is a callable too).
WeightingSpec = str | Weighting | WeightingFn


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): factory for name, factory in METHODS.items()}


def _is_torchjd(spec: object) -> bool:
    aggregation = sys.modules.get("torchjd.aggregation")  # a TorchJD object means TorchJD is imported
    return aggregation is not None and isinstance(spec, (aggregation.Weighting, aggregation.Aggregator))


def make_weighting(spec: WeightingSpec) -> Weighting:
    """The weighting ``spec`` names or is.

    Names ignore case, spaces, ``-`` and ``_`` (``"IMTL-G"``, ``"imtlg"``, ``"Nash_MTL"``). A
    :class:`~gradconflict.weighting.Weighting` is used as is (so its state carries over between calls); a TorchJD
    ``Weighting`` or weighted aggregator is wrapped in a :class:`~gradconflict.weighting.TorchJDWeighting`; any
    other callable is a ``(gram, losses) -> weights`` function.

    >>> make_weighting("Aligned_MTL").name, make_weighting(lambda gram, losses: [1.0] * len(losses)).name
    ('aligned-mtl', '<lambda>')
    """
    if isinstance(spec, Weighting):
        return spec
    if isinstance(spec, str):
        factory = _BY_KEY.get(_key(spec))
        if factory is None:
            raise ValueError(
                f"unknown weighting {spec!r}; the methods are {list(METHODS)}. Or pass a Weighting, a "
                "(gram, losses) -> weights function, or a TorchJD Weighting"
            )
        return factory()
    if _is_torchjd(spec):
        return TorchJDWeighting(spec)
    if callable(spec):
        return FunctionWeighting(spec)
    raise TypeError(
        f"weighting must be a method name ({list(METHODS)}), a Weighting, a (gram, losses) -> weights function or "
        f"a TorchJD Weighting; got {type(spec).__name__}"
    )
