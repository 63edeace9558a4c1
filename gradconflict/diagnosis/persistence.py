"""Every pair's conflict tested against chance, on the whole shared backbone and on each layer, as one family.

:func:`conflict_tests` reads the cosines of every measured step (each pair over the steps that carried both
tasks; each layer over the steps that carried it) and runs :func:`~gradconflict.diagnosis.stats.persistence_tests`
on all of them at once, so that the Benjamini-Hochberg adjustment covers every pair on the whole backbone and on
every layer: a conflict confined to a few upper layers is judged with the same evidence as one over the whole
backbone, and testing many layers does not make a chance conflict look persistent.

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
from gradconflict.diagnosis.stats import PersistenceTests, persistence_tests, signs

__all__ = ["ConflictTests", "conflict_tests"]


@dataclass(frozen=True)
class ConflictTests:
    """The persistence tests of every pair, on the whole backbone and on each layer (one adjusted family).

    Attributes:
        tasks: the task names, sorted.
        pairs: the pairs ``(i, j)``, ``i < j``, in the order of every P-sized axis.
        layers: layer names, in the order of :attr:`by_layer` (first appearance in the run).
        whole: the tests of the pairs on the whole shared backbone (``[P]``).
        by_layer: one :class:`~gradconflict.diagnosis.stats.PersistenceTests` (``[P]``) per layer.
        mean_cosine: ``[P]`` each pair's mean cosine on the whole backbone (NaN: never measured together).
        layer_mean_cosine: ``[L, P]`` the same per layer.
        threshold: the conflict cosine ``S``.
        alpha: the significance level the undetermined pairs' ``steps_needed`` were computed for.
        step_gap: training steps between consecutive measured steps (``k`` under ``every=k``).
    """

    tasks: tuple[str, ...]
    pairs: list[tuple[int, int]]
    layers: tuple[str, ...]
    whole: PersistenceTests
    by_layer: list[PersistenceTests]
    mean_cosine: np.ndarray
    layer_mean_cosine: np.ndarray
    threshold: float
    alpha: float
    step_gap: int

    def pair_name(self, p: int) -> str:
        """``"a/b"`` for the pair at position ``p``."""
        i, j = self.pairs[p]
        return f"{self.tasks[i]}/{self.tasks[j]}"

    def layer(self, name: str) -> PersistenceTests:
        """The tests of one layer."""
        return self.by_layer[self.layers.index(name)]


def _pair_series(cosine: np.ndarray, pairs: list[tuple[int, int]], threshold: float) -> tuple[np.ndarray, ...]:
    """``(signs, present, mean cosine)`` of the pairs of ``cosine`` ``[S, ..., T, T]``: ``[S, ..., P]`` each."""
    i, j = (np.array(x, dtype=np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, int), np.zeros(0, int))
    values = cosine[..., i, j]
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        mean = np.where(present.any(0), np.nansum(values, 0) / np.maximum(present.sum(0), 1), np.nan)
    return signs(values, threshold), present, mean


def conflict_tests(history: Run, threshold: float | None = None, alpha: float = 0.05) -> ConflictTests:
    """Test every pair's conflict against chance on the whole backbone and on each layer (see the module
    docstring). ``threshold`` defaults to the ``S`` the run was measured with."""
    aligned = align(history)
    S = aligned.threshold if threshold is None else float(threshold)
    T, L = len(aligned.tasks), len(aligned.layers)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    P, n = len(pairs), aligned.num_steps
    whole_sign, whole_present, whole_mean = _pair_series(aligned.cosine, pairs, S)
    layer_sign = np.zeros((n, L, P), dtype=np.int8)
    layer_present = np.zeros((n, L, P), dtype=bool)
    layer_mean = np.full((L, P), np.nan)
    for layers, cosine, _ in aligned.layer_blocks(S):
        layer_sign[:, layers], layer_present[:, layers], layer_mean[layers] = _pair_series(cosine, pairs, S)
    family = persistence_tests(
        np.concatenate([whole_sign, layer_sign.reshape(n, L * P)], axis=1),
        np.concatenate([whole_present, layer_present.reshape(n, L * P)], axis=1),
        alpha,
    )
    return ConflictTests(
        tasks=aligned.tasks,
        pairs=pairs,
        layers=aligned.layers,
        whole=family.take(slice(0, P)),
        by_layer=[family.take(slice(P + k * P, P + (k + 1) * P)) for k in range(L)],
        mean_cosine=whole_mean,
        layer_mean_cosine=layer_mean,
        threshold=S,
        alpha=alpha,
        step_gap=aligned.step_gap,
    )
