"""Diagnosis: turn a run's per-step conflict reports into the answer to "should we split the shared backbone,
where, and into which task groups?", with the evidence shown.

- :mod:`~gradconflict.diagnosis.aligned`: the measured steps on one task order (sorted names), as numpy arrays.
- :mod:`~gradconflict.diagnosis.trends`: series, EMA, sliding windows, trend test over training steps.
- :mod:`~gradconflict.diagnosis.persistence`: is a pair's conflict persistent, or chance? (tests against a coin).
- :mod:`~gradconflict.diagnosis.conflicts`: those tests for every pair, on the whole backbone and per layer.
- :mod:`~gradconflict.diagnosis.signals`: the four warning signals and the two warnings about what a split
  cannot cure (a package: one module per family of signals over a shared base).
- :mod:`~gradconflict.diagnosis.profile`: the layer conflict profile and the branch point.
- :mod:`~gradconflict.diagnosis.recon`: Recon's top-K conflicting layers.
- :mod:`~gradconflict.diagnosis.affinity`: inter-task affinity (first-order transference, exact lookahead).
- :mod:`~gradconflict.diagnosis.groups`: task groups by affinity.
- :mod:`~gradconflict.diagnosis.examples`: the examples that carry a pair's conflict (runs measured with
  ``sample_ids``), the share they carry and what removing them would do.
- :mod:`~gradconflict.diagnosis.advice`: :func:`advise`; :mod:`~gradconflict.diagnosis.advice_types` holds
  :class:`Advice` and :class:`Uncertainty`, :mod:`~gradconflict.diagnosis.next_step` the next step's code.
- :mod:`~gradconflict.diagnosis.thresholds`: every threshold, with its source.

Tasks are tracked by name: every part works on the sorted union of the task names over the measured steps, so
the order of the losses dict never matters, and steps may carry a subset of the tasks (partial labels) or a
single one (round-robin training); pair statistics are taken over the steps that carried both tasks.

>>> from gradconflict.diagnosis import Advice, Signal, Thresholds, advise
"""

from __future__ import annotations

from gradconflict.diagnosis.advice import Advice, Uncertainty, advise, advise_from_jsonl, next_step_code
from gradconflict.diagnosis.affinity import lookahead_transference, mean_transference, normalized
from gradconflict.diagnosis.aligned import Aligned, align
from gradconflict.diagnosis.conflicts import ConflictTests, conflict_tests
from gradconflict.diagnosis.evaluations import EvalTable
from gradconflict.diagnosis.examples import ConflictingExamples, conflicting_examples
from gradconflict.diagnosis.groups import Grouping, group_tasks
from gradconflict.diagnosis.heads import HeadStats, head_stats, linear_cka
from gradconflict.diagnosis.persistence import PersistenceTests, persistence_tests
from gradconflict.diagnosis.profile import LayerProfile, Profile, layer_profile, order_layers
from gradconflict.diagnosis.recon import ReconSelection, recon_layers, recon_scores
from gradconflict.diagnosis.signals import (
    PairFinding,
    Signal,
    ceiling,
    diverging_objectives,
    heavy_heads,
    oscillating_conflict,
    single_point_of_risk,
    zero_sum,
)
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import QuantitySummary, Trend, ema, series, summarize, trend, window_means

__all__ = [
    "Advice",
    "Aligned",
    "ConflictTests",
    "ConflictingExamples",
    "EvalTable",
    "Grouping",
    "HeadStats",
    "LayerProfile",
    "PairFinding",
    "PersistenceTests",
    "Profile",
    "QuantitySummary",
    "ReconSelection",
    "Signal",
    "Thresholds",
    "Trend",
    "Uncertainty",
    "advise",
    "advise_from_jsonl",
    "align",
    "ceiling",
    "conflict_tests",
    "conflicting_examples",
    "diverging_objectives",
    "ema",
    "group_tasks",
    "head_stats",
    "heavy_heads",
    "layer_profile",
    "linear_cka",
    "lookahead_transference",
    "mean_transference",
    "next_step_code",
    "normalized",
    "order_layers",
    "oscillating_conflict",
    "persistence_tests",
    "recon_layers",
    "recon_scores",
    "series",
    "single_point_of_risk",
    "summarize",
    "trend",
    "window_means",
    "zero_sum",
]
