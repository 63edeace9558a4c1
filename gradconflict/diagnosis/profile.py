"""Layer conflict profile: where in the backbone the tasks conflict, and the depth to branch at.

For each shared layer ``l`` (bottom to top) the profile keeps Recon's S-conflict score (the number of task pairs
with ``C^(l)_ij < S``, summed over the measured steps), each pair's persistence (share of steps it conflicts)
and mean cosine on that layer. A layer *conflicts* when its worst pair's persistence reaches
``Thresholds.layer_conflict``. The recommended branch point is the shallowest conflicting layer from which the
layers up to the top conflict on average: from there on the layers should become task-specific.

Tasks are tracked by name, in sorted order (:mod:`~gradconflict.diagnosis.aligned`): a pair's persistence and
mean cosine are taken over the steps that carried both tasks on that layer (:attr:`LayerProfile.together`), and
a pair never measured together has NaN. A layer on which no pair was ever measured (every step carried one
task) has no worst persistence (NaN) and takes no part in the choice of the branch point.

>>> import torch
>>> from gradconflict import ConflictReport, LayerReport
>>> agree, fight = torch.tensor([[1.0, 0.5], [0.5, 1.0]]), torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
>>> layers = {"top": LayerReport("top", "ab", fight, num_params=10),
...           "bottom": LayerReport("bottom", "ab", agree, num_params=30)}
>>> p = layer_profile([ConflictReport("ab", agree + fight, layers=layers)], layer_order=["bottom", "top"])
>>> p.branch_point, p.duplicated_share
('top', 0.25)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from gradconflict.diagnosis.aligned import Run, align
from gradconflict.diagnosis.thresholds import Thresholds

__all__ = ["LayerProfile", "Profile", "branch_point", "layer_profile", "order_layers", "worst_pair"]


def worst_pair(persistence: np.ndarray, mean_cosine: np.ndarray) -> tuple[int, int]:
    """The pair ``(i, j)``, ``i < j``, that conflicts most often; ties go to the lower mean cosine, and pairs
    never measured together (NaN persistence) come last.

    >>> worst_pair(np.zeros((3, 3)), np.array([[1, .5, .2], [.5, 1, -.3], [.2, -.3, 1]]))
    (1, 2)
    >>> worst_pair(np.array([[0, np.nan, .1], [0, 0, np.nan], [0, 0, 0]]), np.zeros((3, 3)))
    (0, 2)
    """
    i, j = np.triu_indices(persistence.shape[0], 1)
    if not len(i):
        return 0, 0
    p, c = persistence[i, j], mean_cosine[i, j]
    best = np.lexsort((np.where(np.isnan(c), np.inf, c), np.where(np.isnan(p), np.inf, -p)))[0]
    return int(i[best]), int(j[best])


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    # Digits compare as numbers so that "backbone.10" comes after "backbone.2".
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def order_layers(
    names: Iterable[str], *, model: nn.Module | None = None, layer_order: Sequence[str] | None = None
) -> list[str]:
    """Layer names from the bottom of the network to the top.

    ``layer_order`` (an explicit list) wins; otherwise, with a ``model``, the order of first appearance in
    ``model.named_modules()``; otherwise natural sort. Names that the first two do not know come last, in
    natural order.

    >>> order_layers(["backbone.10", "backbone.2", "backbone.0"])
    ['backbone.0', 'backbone.2', 'backbone.10']
    """
    names = list(dict.fromkeys(names))
    if layer_order is not None:
        rank = {n: k for k, n in enumerate(layer_order)}
    elif model is not None:
        rank = {}
        for k, (n, _) in enumerate(model.named_modules()):
            rank.setdefault(n, k)
    else:
        rank = {}
    known = sorted((n for n in names if n in rank), key=rank.__getitem__)
    return known + sorted((n for n in names if n not in rank), key=_natural_key)


@dataclass(frozen=True)
class LayerProfile:
    """The conflict of one layer over a run.

    Attributes:
        name: layer name.
        num_params: shared parameter entries in the layer.
        steps: measured steps that include this layer.
        score: Recon's S-conflict score: conflicting pairs summed over steps.
        persistence: T x T (upper triangle; 0 below it) share of the steps carrying both tasks on which the pair
            conflicts; NaN for a pair never measured together.
        mean_cosine: T x T mean cosine of each pair over the steps carrying both tasks (NaN: never together).
        together: T x T number of steps that carried both tasks on this layer (the diagonal: that carried the
            task); ``None`` when unknown.
    """

    name: str
    num_params: int
    steps: int
    score: int
    persistence: np.ndarray
    mean_cosine: np.ndarray
    together: np.ndarray | None = None

    @property
    def worst_persistence(self) -> float:
        """The persistence of the pair that conflicts most often on this layer, over the pairs measured
        together; NaN when no pair was (one task, or every step carried a single task)."""
        upper = self.persistence[np.triu_indices(self.persistence.shape[0], 1)]
        measured = upper[~np.isnan(upper)]
        return float(measured.max()) if measured.size else float("nan")


@dataclass(frozen=True)
class Profile:
    """Layer profiles from bottom to top, and the recommended branch point.

    Attributes:
        tasks: task names, sorted (the order of every T x T array of the layers).
        layers: one :class:`LayerProfile` per layer, bottom to top.
        branch_point: the layer from which the backbone should become task-specific, or ``None``.
        duplicated_share: share of the profiled parameters at and above the branch point (0 without one).
        threshold: the layer-conflict threshold used.
    """

    tasks: tuple[str, ...]
    layers: list[LayerProfile]
    branch_point: str | None
    duplicated_share: float
    threshold: float

    def table(self) -> str:
        """A plain-text table, bottom layer first: parameters, score, worst persistence and worst pair (``-`` on
        a layer where no pair was measured together)."""
        lines = [f"{'layer':<28} {'params':>9} {'score':>7} {'worst pair':<16} {'persist':>7} {'mean cos':>8}"]
        for layer in self.layers:
            i, j = worst_pair(layer.persistence, layer.mean_cosine)
            measured = len(self.tasks) > 1 and not np.isnan(layer.persistence[i, j])
            pair = f"{self.tasks[i]}/{self.tasks[j]}" if measured else "-"
            persist = f"{layer.worst_persistence:>7.2f}" if measured else f"{'-':>7}"
            cos = f"{float(layer.mean_cosine[i, j]):>+8.2f}" if measured else f"{'-':>8}"
            mark = "  <- branch" if layer.name == self.branch_point else ""
            lines.append(f"{layer.name:<28} {layer.num_params:>9} {layer.score:>7} {pair:<16} {persist} {cos}{mark}")
        return "\n".join(lines)


def branch_point(layers: Sequence[LayerProfile], threshold: float) -> str | None:
    """The shallowest layer that conflicts (worst persistence >= ``threshold``) and from which the layers up
    to the top conflict on average; ``None`` when there is no such layer. ``layers`` go bottom to top. Layers
    on which no pair was measured (NaN worst persistence) are left out of the averages."""
    worst = np.array([layer.worst_persistence for layer in layers], dtype=np.float64)
    measured = ~np.isnan(worst)
    for k, layer in enumerate(layers):
        if measured[k] and worst[k] >= threshold and float(worst[k:][measured[k:]].mean()) >= threshold:
            return layer.name
    return None


def layer_profile(
    history: Run,
    *,
    model: nn.Module | None = None,
    layer_order: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
) -> Profile:
    """The :class:`Profile` of the measured steps of a run (layers ordered by :func:`order_layers`; tasks in
    sorted order, each pair over the steps that carried both tasks)."""
    th = thresholds or Thresholds()
    aligned = align(history)
    if not aligned.num_steps:
        raise ValueError("the history has no measured step: nothing to profile")
    tasks = aligned.tasks
    T = len(tasks)
    together, conflicts, cosine_sum = aligned.layer_pair_stats(th.conflict_cosine)  # each [L, T, T]
    upper = np.triu(np.ones((T, T), dtype=bool), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        persistence = np.where(upper, np.where(together > 0, conflicts / together, np.nan), 0.0)
        mean_cosine = np.where(together > 0, cosine_sum / together, np.nan)
    steps = aligned.layer_present.sum(0)
    index = {n: k for k, n in enumerate(aligned.layers)}
    names = order_layers(aligned.layers, model=model, layer_order=layer_order)
    profiles = [
        LayerProfile(
            name=name,
            num_params=int(aligned.layer_params[k]),
            steps=int(steps[k]),
            score=int(conflicts[k].sum()),
            persistence=persistence[k],
            mean_cosine=mean_cosine[k],
            together=together[k],
        )
        for name in names
        for k in (index[name],)
    ]
    branch = branch_point(profiles, th.layer_conflict)
    total = sum(p.num_params for p in profiles)
    above = 0
    if branch is not None:
        start = [p.name for p in profiles].index(branch)
        above = sum(p.num_params for p in profiles[start:])
    return Profile(tasks, profiles, branch, above / total if total else 0.0, th.layer_conflict)
