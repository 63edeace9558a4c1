"""Layer conflict profile: where in the backbone the tasks conflict, and the depth to branch at.

For each shared layer ``l`` (bottom to top) the profile keeps Recon's S-conflict score (the number of task pairs
with ``C^(l)_ij < S``, summed over the measured steps), each pair's persistence (share of steps it conflicts)
and mean cosine on that layer. A layer *conflicts* when its worst pair's persistence reaches
``Thresholds.layer_conflict``. The recommended branch point is the shallowest conflicting layer from which the
layers up to the top conflict on average: from there on the layers should become task-specific.

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
import torch
from torch import nn

from gradconflict import metrics
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import Reports, measured_reports

__all__ = ["LayerProfile", "Profile", "branch_point", "layer_profile", "order_layers", "worst_pair"]


def worst_pair(persistence: np.ndarray, mean_cosine: np.ndarray) -> tuple[int, int]:
    """The pair ``(i, j)``, ``i < j``, that conflicts most often; ties go to the lower mean cosine.

    >>> worst_pair(np.zeros((3, 3)), np.array([[1, .5, .2], [.5, 1, -.3], [.2, -.3, 1]]))
    (1, 2)
    """
    i, j = np.triu_indices(persistence.shape[0], 1)
    if not len(i):
        return 0, 0
    best = np.lexsort((mean_cosine[i, j], -persistence[i, j]))[0]
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
        persistence: T x T (upper triangle) share of steps each pair conflicts.
        mean_cosine: T x T mean cosine of each pair over the steps.
    """

    name: str
    num_params: int
    steps: int
    score: int
    persistence: np.ndarray
    mean_cosine: np.ndarray

    @property
    def worst_persistence(self) -> float:
        """The persistence of the pair that conflicts most often on this layer (0 with one task)."""
        return float(self.persistence.max()) if self.persistence.size else 0.0


@dataclass(frozen=True)
class Profile:
    """Layer profiles from bottom to top, and the recommended branch point.

    Attributes:
        tasks: task names.
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
        """A plain-text table, bottom layer first: parameters, score, worst persistence and worst pair."""
        lines = [f"{'layer':<28} {'params':>9} {'score':>7} {'worst pair':<16} {'persist':>7} {'mean cos':>8}"]
        for layer in self.layers:
            i, j = worst_pair(layer.persistence, layer.mean_cosine)
            pair = f"{self.tasks[i]}/{self.tasks[j]}" if len(self.tasks) > 1 else "-"
            mark = "  <- branch" if layer.name == self.branch_point else ""
            lines.append(
                f"{layer.name:<28} {layer.num_params:>9} {layer.score:>7} {pair:<16} "
                f"{layer.worst_persistence:>7.2f} {float(layer.mean_cosine[i, j]):>+8.2f}{mark}"
            )
        return "\n".join(lines)


def branch_point(layers: Sequence[LayerProfile], threshold: float) -> str | None:
    """The shallowest layer that conflicts (worst persistence >= ``threshold``) and from which the layers up
    to the top conflict on average; ``None`` when there is no such layer. ``layers`` go bottom to top."""
    worst = [layer.worst_persistence for layer in layers]
    for k, layer in enumerate(layers):
        if worst[k] >= threshold and float(np.mean(worst[k:])) >= threshold:
            return layer.name
    return None


def layer_profile(
    history: Reports,
    *,
    model: nn.Module | None = None,
    layer_order: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
) -> Profile:
    """The :class:`Profile` of the measured steps of a run (layers ordered by :func:`order_layers`)."""
    th = thresholds or Thresholds()
    reports = measured_reports(history)
    if not reports:
        raise ValueError("the history has no measured step: nothing to profile")
    tasks = reports[0].tasks
    T = len(tasks)
    names = order_layers((n for r in reports for n in r.layers), model=model, layer_order=layer_order)
    profiles = []
    for name in names:
        per_step = [r.layers[name] for r in reports if name in r.layers]
        conflicts = torch.stack([metrics.conflict_pairs(lr.gram, th.conflict_cosine).cpu() for lr in per_step])
        cosines = torch.stack([lr.cosine.double().cpu() for lr in per_step])
        profiles.append(
            LayerProfile(
                name=name,
                num_params=per_step[-1].num_params,
                steps=len(per_step),
                score=int(conflicts.sum()),
                persistence=conflicts.double().mean(0).numpy(),
                mean_cosine=cosines.mean(0).numpy() if T else np.zeros((0, 0)),
            )
        )
    branch = branch_point(profiles, th.layer_conflict)
    total = sum(p.num_params for p in profiles)
    above = 0
    if branch is not None:
        start = [p.name for p in profiles].index(branch)
        above = sum(p.num_params for p in profiles[start:])
    return Profile(tasks, profiles, branch, above / total if total else 0.0, th.layer_conflict)
