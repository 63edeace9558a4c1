"""The warning signals, each a :class:`Signal` with a value, a threshold, a status and one sentence of evidence a
person can check.

The four signals that the shared backbone is in trouble:

1. :func:`diverging_objectives`: task pairs whose gradients conflict persistently (significantly more often than
   unrelated gradients would, see :mod:`~gradconflict.diagnosis.persistence`), on the whole backbone or on some layers.
2. :func:`heavy_heads`: heads large or deep relative to the backbone, rewriting its features (linear CKA).
3. :func:`zero_sum`: steps whose update works against some task; evaluations that trade one task for another.
4. :func:`single_point_of_risk`: negative transference, a step for one task raising another's loss.

And the two warnings about what a split cannot cure:

5. :func:`oscillating_conflict`: conflict that comes and goes like a coin points to the data (label noise, small
   batches), not to the shared capacity; after a split, the same reading of the split model's run.
6. :func:`ceiling`: a ceiling that does not move when the tasks are split (the comparison experiment, a paired
   test across seeds) means capacity was not the limit.

And one signal for what a re-weighting cures more cheaply than a split:

7. :func:`magnitude_dominance`: one task's gradient an order of magnitude larger than another's on most steps
   (Yu et al.'s "dominating magnitudes"): the smaller task barely moves the shared backbone, aligned or not.

A signal whose input is missing (no model for the heads, a single task, no step that carried two tasks together,
no comparison) has status ``"n/a"`` and its evidence says what to pass or to measure.

Each :class:`Signal` carries typed fields (the status, the headline value and what it measures, the p-value and the
effect size of the test that decides it, the task pairs and the layers it points at, the decisive
:class:`PairFinding`); its evidence is a sentence rendered from those numbers for a person, and nothing reads it
back. Read the fields.

Tasks are tracked by name (:mod:`~gradconflict.diagnosis.aligned`): pairs are named by
:func:`~gradconflict.records.pairs.pair_key` (``"a/b"``, the names sorted), each pair statistic is taken over the
steps that carried both tasks, and the evidence says on how many steps that was when some steps lacked one of them.

>>> import torch
>>> from gradconflict import ConflictReport
>>> fight = ConflictReport("ab", torch.tensor([[1.0, -0.9], [-0.9, 1.0]]), losses=torch.ones(2))
>>> s = diverging_objectives([fight] * 8)
>>> s.status, s.value, s.statistic, s.pairs, s.finding.steps
('split', 1.0, 'persistence', (('a', 'b'),), 8)
>>> single_point_of_risk([fight] * 8).status
'split'
>>> alone = [ConflictReport(t, torch.ones(1, 1), step=s) for s, t in enumerate("abab")]   # round-robin
>>> diverging_objectives(alone).status
'n/a'
"""

from gradconflict.diagnosis.signals.base import (
    ALARMS,
    REWEIGHT,
    SIGNALS,
    STATUSES,
    WARNINGS,
    PairFinding,
    Signal,
    worst_status,
)
from gradconflict.diagnosis.signals.base import (
    Status as Status,
)
from gradconflict.diagnosis.signals.ceiling import ceiling
from gradconflict.diagnosis.signals.magnitude import (
    MAGNITUDE_WEIGHTINGS as MAGNITUDE_WEIGHTINGS,
)
from gradconflict.diagnosis.signals.magnitude import magnitude_dominance
from gradconflict.diagnosis.signals.magnitude import update_shares as update_shares
from gradconflict.diagnosis.signals.persistent import diverging_objectives, oscillating_conflict
from gradconflict.diagnosis.signals.persistent import oscillation_cause as oscillation_cause
from gradconflict.diagnosis.signals.risk import heavy_heads, single_point_of_risk, zero_sum

__all__ = [
    "ALARMS",
    "REWEIGHT",
    "SIGNALS",
    "STATUSES",
    "WARNINGS",
    "PairFinding",
    "Signal",
    "ceiling",
    "diverging_objectives",
    "heavy_heads",
    "magnitude_dominance",
    "oscillating_conflict",
    "single_point_of_risk",
    "worst_status",
    "zero_sum",
]
