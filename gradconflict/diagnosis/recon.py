"""Recon's layer selection: the K layers whose task gradients conflict most often become task-specific.

Recon (Shi et al., "Recon: Reducing Conflicting Gradients from the Root for Multi-Task Learning", ICLR 2023,
Algorithm 1) trains the shared network for a while, scores every shared layer ``l`` with its *S-conflict score*
``s_l = sum_t sum_{i<j} 1[cos(g_i^(l)(t), g_j^(l)(t)) < S]`` (conflicting task pairs, counted over the training
iterations), and turns the ``K`` layers with the highest scores into task-specific layers, wherever they are in the
network. The scores come from a chosen window of training (Recon uses its early part); here ``window`` selects the
measured steps, and a pair counts on a step only when both tasks were measured on it and both have a non-zero
gradient on the layer (:func:`gradconflict.measure.metrics.conflict_pairs`).

Unlike the single branch point (:mod:`~gradconflict.diagnosis.profile`), the selected layers need not be
contiguous: it is Recon's answer, reported next to the branch point.

>>> import torch
>>> from gradconflict import ConflictReport, LayerReport
>>> fight, agree = torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), torch.tensor([[1.0, 0.5], [0.5, 1.0]])
>>> def step(s):
...     layers = {"l0": LayerReport("l0", "ab", agree), "l1": LayerReport("l1", "ab", fight if s % 2 else agree),
...               "l2": LayerReport("l2", "ab", fight)}
...     return ConflictReport("ab", agree, layers=layers, step=s)
>>> sel = recon_layers([step(s) for s in range(10)], k=2)
>>> sel.layers, sel.scores
(['l2', 'l1'], {'l0': 0, 'l1': 5, 'l2': 10})
>>> recon_layers([step(s) for s in range(10)], k=1, window=(0, 3)).scores["l1"]   # steps 0..3: 1 and 3 fight
2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradconflict.diagnosis.aligned import Aligned, Run, align

__all__ = ["ReconSelection", "recon_layers", "recon_scores"]


@dataclass(frozen=True)
class ReconSelection:
    """Recon's top-K layers.

    Attributes:
        layers: the ``K`` selected layers, highest score first.
        scores: every layer's S-conflict score over the window (in the run's layer order).
        k: how many layers were asked for.
        window: the first and last training step whose measurements were scored.
        threshold: the conflict cosine ``S``.
    """

    layers: list[str]
    scores: dict[str, int]
    k: int
    window: tuple[int, int]
    threshold: float


def _scores(aligned: Aligned, S: float, window: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores [L], mean cosine over the pairs [L], the steps scored)`` in one pass over the layers."""
    first, last = window if window is not None else (-np.inf, np.inf)
    inside = (aligned.steps >= first) & (aligned.steps <= last)
    T = len(aligned.tasks)
    upper = np.triu(np.ones((T, T), dtype=bool), 1)
    scores = np.zeros(len(aligned.layers), dtype=np.int64)
    total, count = np.zeros(len(aligned.layers)), np.zeros(len(aligned.layers), dtype=np.int64)
    for rows, layers, cosine, conflicts in aligned.layer_blocks(S):
        kept = inside[rows]
        scores[layers] += conflicts[kept].sum((0, 2, 3))
        measured = upper & ~np.isnan(cosine[kept])
        total[layers] += np.where(measured, cosine[kept], 0.0).sum((0, 2, 3))
        count[layers] += measured.sum((0, 2, 3))
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return scores, mean, aligned.steps[inside]


def recon_scores(
    history: Run, threshold: float | None = None, window: tuple[int, int] | None = None
) -> dict[str, int]:
    """Every layer's S-conflict score (Recon, Alg. 1) over the measured steps in ``window`` (first and last
    training step, inclusive; default: every measured step). ``threshold`` defaults to the run's ``S``."""
    aligned = align(history)
    S = aligned.threshold if threshold is None else float(threshold)
    scores, _, _ = _scores(aligned, S, window)
    return {name: int(v) for name, v in zip(aligned.layers, scores)}


def recon_layers(
    history: Run, k: int, *, threshold: float | None = None, window: tuple[int, int] | None = None
) -> ReconSelection:
    """The ``k`` layers with the highest S-conflict scores (Recon, Alg. 1); ties go to the layer whose pairs'
    cosines are lower on average over the window, then to the earlier layer. Layers that never conflicted are
    not selected, so fewer than ``k`` may come back."""
    if k < 0:
        raise ValueError(f"k must be a non-negative number of layers, got {k}")
    aligned = align(history)
    S = aligned.threshold if threshold is None else float(threshold)
    scores, mean, steps = _scores(aligned, S, window)
    order = sorted(range(len(aligned.layers)), key=lambda n: (-scores[n], mean[n], n))
    chosen = [aligned.layers[n] for n in order if scores[n] > 0][:k]
    span = (int(steps[0]), int(steps[-1])) if len(steps) else (0, -1)
    return ReconSelection(chosen, {name: int(v) for name, v in zip(aligned.layers, scores)}, k, span, S)
