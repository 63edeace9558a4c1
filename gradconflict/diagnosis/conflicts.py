"""Every pair's conflict tested against chance, on the whole shared backbone and on each layer, as one family.

:func:`conflict_tests` reads the cosines of every measured step (each pair over the steps that carried both tasks;
each layer over the steps that carried it) and tests all of them as one family
(:func:`~gradconflict.diagnosis.persistence.family_tests`), so that the Benjamini-Hochberg adjustment covers every
pair on the whole backbone and on every layer: a conflict confined to a few upper layers is judged with the same
evidence as one over the whole backbone, and testing many layers does not make a chance conflict look persistent.

>>> import torch
>>> from gradconflict import ConflictReport, LayerReport
>>> agree, fight = torch.tensor([[1.0, 0.9], [0.9, 1.0]]), torch.tensor([[0.1, -0.09], [-0.09, 0.1]])
>>> layers = {"top": LayerReport("top", "ab", fight), "bottom": LayerReport("bottom", "ab", agree)}
>>> run = [ConflictReport("ab", agree + fight, layers=layers, step=s) for s in range(20)]
>>> t = conflict_tests(run)
>>> t.layers, t.pairs
(('top', 'bottom'), [(0, 1)])
>>> bool(t.whole.persistent(0.05)[0]), [bool(x.persistent(0.05)[0]) for x in t.by_layer]
(False, [True, False])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradconflict.diagnosis.aligned import Run, align
from gradconflict.diagnosis.persistence import PersistenceTests, SeriesStatistics, family_tests, series_statistics
from gradconflict.diagnosis.thresholds import ALPHA
from gradconflict.records.pairs import pair_key

__all__ = ["ConflictTests", "conflict_tests"]


@dataclass(frozen=True)
class ConflictTests:
    """The persistence tests of every pair, on the whole backbone and on each layer (one adjusted family).

    Attributes:
        tasks: the task names, sorted.
        pairs: the pairs ``(i, j)``, ``i < j``, in the order of every P-sized axis.
        layers: layer names, in the order of :attr:`by_layer` (the run's layer order, bottom to top).
        whole: the tests of the pairs on the whole shared backbone (``[P]``).
        by_layer: one :class:`~gradconflict.diagnosis.persistence.PersistenceTests` (``[P]``) per layer.
        layer_scores: ``[L]`` Recon's S-conflict score of each layer over the run (conflicting pairs summed over
            steps, :func:`gradconflict.measure.metrics.conflict_pairs`).
        threshold: the conflict cosine ``S``.
        step_gap: training steps between consecutive measured steps (``k`` under ``every=k``).
    """

    tasks: tuple[str, ...]
    pairs: list[tuple[int, int]]
    layers: tuple[str, ...]
    whole: PersistenceTests
    by_layer: list[PersistenceTests]
    layer_scores: np.ndarray
    threshold: float
    step_gap: int

    def pair(self, p: int) -> tuple[str, str]:
        """The task names of the pair at position ``p``, sorted."""
        i, j = self.pairs[p]
        return self.tasks[i], self.tasks[j]

    def pair_name(self, p: int) -> str:
        """The key of the pair at position ``p`` (:func:`~gradconflict.records.pairs.pair_key`, ``"a/b"``)."""
        return pair_key(*self.pair(p))

    @property
    def family_size(self) -> int:
        """The number of tests of the adjusted family: every pair measured on the whole backbone and on each
        layer."""
        return int((self.whole.steps > 0).sum() + sum(int((t.steps > 0).sum()) for t in self.by_layer))


def _pair_cosines(cosine: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """``cosine`` ``[S, ..., T, T]`` -> the pairs' cosines ``[S, ..., P]`` (NaN where not measured)."""
    i, j = (np.array(x, dtype=np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, int), np.zeros(0, int))
    return cosine[..., i, j]


def conflict_tests(history: Run, threshold: float | None = None, alpha: float = ALPHA) -> ConflictTests:
    """Test every pair's conflict against chance on the whole backbone and on each layer (see the module
    docstring). ``threshold`` defaults to the ``S`` the run was measured with."""
    aligned = align(history)
    S = aligned.threshold if threshold is None else float(threshold)
    T, L = len(aligned.tasks), len(aligned.layers)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    P, n = len(pairs), aligned.num_steps
    # The family's series summed up a few at a time (the whole backbone's pairs, then each tile of layers, whose
    # steps arrive in order), never all [S, (1 + L) P] at once: a long run has millions of steps.
    parts = [series_statistics(aligned.cosine_pairs(pairs), S)]
    scores = np.zeros(L, dtype=np.int64)
    layer_cosine = np.empty((n, 0, P))
    for rows, layers, cosine, conflicts in aligned.layer_blocks(S):
        if rows.start == 0:
            layer_cosine = np.empty((n, layers.stop - layers.start, P))
        layer_cosine[rows] = _pair_cosines(cosine, pairs)
        scores[layers] += conflicts.sum((0, 2, 3))
        if rows.stop == n:
            parts.append(series_statistics(layer_cosine.reshape(n, -1), S))
    family = family_tests(SeriesStatistics.concatenate(parts), alpha)
    by_layer = [family.take(slice(P + k * P, P + (k + 1) * P)) for k in range(L)]
    return ConflictTests(
        tasks=aligned.tasks,
        pairs=pairs,
        layers=aligned.layers,
        whole=family.take(slice(0, P)),
        by_layer=by_layer,
        layer_scores=scores,
        threshold=S,
        step_gap=aligned.step_gap,
    )
