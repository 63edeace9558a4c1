"""Every threshold the diagnosis uses, in one frozen dataclass with documented defaults.

Nothing in :mod:`gradconflict.diagnosis` compares against a number that is not a field here. Override any of
them with ``dataclasses.replace`` or by passing a dict to :func:`~gradconflict.diagnosis.advise`:

>>> t = Thresholds(conflict_cosine=-0.1)        # Recon's stricter conflict threshold
>>> t.conflict_cosine, t.alpha
(-0.1, 0.05)
>>> Thresholds.from_mapping({"alpha": 0.01}).alpha
0.01

Where a default comes from (see ``docs/diagnosis.md`` for the discussion):

- ``conflict_cosine`` (``S``): PCGrad (Yu et al., 2020) calls two gradients conflicting when their cosine is
  negative (``S = 0``); Recon (Shi et al., ICLR 2023) uses ``S`` in ``[-0.1, 0]``.
- ``alpha``: the significance level of every test (the persistence of a conflict against chance, Benjamini-
  Hochberg adjusted, see :mod:`~gradconflict.diagnosis.persistence`; the Mann-Kendall trend test): the conventional 5%.
  There is no cut-off on the persistence or the cancellation themselves: a conflict counts when it is
  significantly more frequent than chance by at least Cohen's small effect.
- ``head_*`` and ``cka_*``: heuristics. Linear CKA is Kornblith et al. (2019); a head whose last hidden layer
  has CKA below 0.4 with the backbone output keeps little of the backbone's representation.
- ``against_*``: the share of steps whose combined update raises some task's loss to first order (an
  alignment ``a_i < 0``); heuristics on the same scale as persistence.
- ``eval_tolerance``: a zero-sum evaluation looks like "+2% for task A, -1.5% for task B"; changes
  smaller than 1% (relative, as LibMTL's Delta-m) are treated as noise.
- ``transfer_*``: TAG (Fifty et al., 2021) treats negative inter-task affinity as the signal to separate
  tasks; here normalised by the task's own self-affinity, so -0.1 means a step on task ``i`` raises task
  ``j``'s loss by a tenth of what a step on ``j`` itself lowers it.
- ``magnitude_gms``: Yu et al. (2020, PCGrad) name "dominating magnitudes" one of the tragic triad and measure
  it by the gradient magnitude similarity ``GMS = 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2)``, without a cut-off. The
  cut-off 0.2 is a convention, not calibrated: one order of magnitude between the norms (a ratio of 10 gives
  ``GMS = 20/101 = 0.198``), where, with equal weights, the smaller task gets under a tenth of the update.
- ``group_tolerance``: partitions whose score is within this of the best are ties, and the fewest groups win
  (prefer sharing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradconflict.measure.metrics import CONFLICT_COSINE

__all__ = ["ALPHA", "Thresholds"]

#: The significance level of every test of the diagnosis by default: the conventional 5%.
ALPHA = 0.05


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the signals, the tests, the task grouping.

    Attributes:
        conflict_cosine: a pair conflicts when its cosine is below this (``S``).
        alpha: significance level of every test (persistence against chance, adjusted; trend).
        head_ratio_watch: head-to-backbone parameter ratio from which signal 2 is ``watch``.
        head_ratio_split: head-to-backbone parameter ratio from which signal 2 is ``split`` (with rewriting).
        head_depth_watch: number of parametrised layers in a head from which signal 2 is ``watch``.
        cka_watch: CKA(backbone output, head's last hidden layer) below which signal 2 is ``watch``.
        cka_split: CKA below which signal 2 is ``split`` (with a heavy head).
        against_watch: share of steps whose update works against some task, from which signal 3 is ``watch``.
        against_split: the same, from which signal 3 is ``split``.
        eval_tolerance: relative change of a metric that counts as an improvement or a regression.
        zero_sum_watch: share of evaluation changes that trade one task for another, from which ``watch``.
        zero_sum_split: the same, from which ``split``.
        transfer_watch: normalised affinity below which signal 4 is ``watch``.
        transfer_split: normalised affinity below which signal 4 is ``split``.
        group_tolerance: partitions scoring within this of the best are ties; the fewest groups win.
        magnitude_gms: gradient magnitude similarity below which a pair's norms count as dominated (signal
            ``magnitude_dominance``).
    """

    conflict_cosine: float = CONFLICT_COSINE
    alpha: float = ALPHA
    head_ratio_watch: float = 0.5
    head_ratio_split: float = 1.0
    head_depth_watch: int = 3
    cka_watch: float = 0.7
    cka_split: float = 0.4
    against_watch: float = 0.25
    against_split: float = 0.5
    eval_tolerance: float = 0.01
    zero_sum_watch: float = 0.25
    zero_sum_split: float = 0.5
    transfer_watch: float = 0.0
    transfer_split: float = -0.1
    group_tolerance: float = 0.05
    magnitude_gms: float = 0.2

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | Thresholds | None) -> Thresholds:
        """The defaults with ``values`` overriding them (a :class:`Thresholds` is returned as is).

        Raises ``ValueError`` on an unknown name, so that a typo never silently keeps a default.
        """
        if values is None:
            return cls()
        if isinstance(values, Thresholds):
            return values
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown threshold(s) {unknown}; the thresholds are {sorted(known)}")
        return cls(**values)
