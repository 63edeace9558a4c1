"""Layer conflict profile: where in the backbone the tasks conflict persistently, and the depth to branch at.

For each shared layer ``l`` (bottom to top) the profile keeps Recon's S-conflict score (the number of task pairs
with ``C^(l)_ij < S``, summed over the measured steps), each pair's persistence (share of steps it conflicts),
mean cosine, and the test of its conflict against chance (:mod:`~gradconflict.diagnosis.persistence`; one
Benjamini-Hochberg family with the whole backbone's pairs, :mod:`~gradconflict.diagnosis.conflicts`). Each layer
gets a status from its pairs:

- ``"conflict"``: some pair conflicts persistently (significantly more often than chance, by at least a small
  effect);
- ``"undetermined"``: no pair yet, but some pair might with more steps;
- ``"agree"``: every pair agrees significantly more often than it conflicts;
- ``"oscillating"``: no pair conflicts persistently and some pair's conflict is at chance level (it comes and
  goes like a coin: the data, not the capacity);
- ``"calm"``: every pair is ruled out, without a clearer pattern;
- ``"n/a"``: no pair was measured on the layer.

The **branch point** is the shallowest ``"conflict"`` layer, unless every layer above it agrees (conflict
confined below agreeing layers gives no branch point): from there on the layers should become task-specific. A
layer above it that conflicts less is still duplicated (its input already carries the conflict).

Tasks are tracked by name, in sorted order (:mod:`~gradconflict.diagnosis.aligned`): a pair's statistics are
taken over the steps that carried both tasks on that layer (:attr:`LayerProfile.together`); a pair never measured
together has NaN.

>>> import torch
>>> from gradconflict import ConflictReport, LayerReport
>>> agree, fight = torch.tensor([[1.0, 0.5], [0.5, 1.0]]), torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
>>> layers = {"top": LayerReport("top", "ab", fight, num_params=10),
...           "bottom": LayerReport("bottom", "ab", agree, num_params=30)}
>>> run = [ConflictReport("ab", agree + fight, layers=layers, step=s) for s in range(12)]
>>> p = layer_profile(run, layer_order=["bottom", "top"])
>>> [(lp.name, lp.status) for lp in p.layers], p.branch_point, p.duplicated_share
([('bottom', 'agree'), ('top', 'conflict')], 'top', 0.25)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import nn

from gradconflict.diagnosis.aligned import Run, align
from gradconflict.diagnosis.conflicts import ConflictTests, conflict_tests
from gradconflict.diagnosis.persistence import PERSISTENT_RATE, PersistenceTests
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.measure.shared import layer_names, layer_ranks
from gradconflict.records.pairs import pair_key

__all__ = [
    "LayerProfile",
    "LayerStatus",
    "Profile",
    "branch_point",
    "layer_profile",
    "layer_status",
    "order_layers",
    "share_from",
    "worst_pair",
    "worst_test",
]

LayerStatus = Literal["conflict", "undetermined", "agree", "oscillating", "calm", "n/a"]


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


def worst_test(tests: PersistenceTests) -> int:
    """The position of the pair whose conflict is the most significant: the lowest adjusted p-value, then the
    highest conflict rate, then the lowest mean cosine; pairs never measured come last (0 without pairs).

    >>> from gradconflict.diagnosis.persistence import persistence_tests
    >>> worst_test(persistence_tests(np.array([[-0.1, -0.5], [-0.1, -0.5], [0.2, 0.3]])))   # same counts
    1
    """
    if not len(tests.steps):
        return 0
    p, r, mean_cosine = tests.p_adjusted, tests.rate, tests.mean_cosine
    keys = (
        np.where(np.isnan(mean_cosine), np.inf, mean_cosine),
        np.where(np.isnan(r), np.inf, -r),
        np.where(np.isnan(p), np.inf, p),
    )
    return int(np.lexsort(keys)[0])


def layer_status(tests: PersistenceTests, alpha: float) -> LayerStatus:
    """A layer's status from its pairs' tests (see the module docstring).

    >>> from gradconflict.diagnosis.persistence import persistence_tests
    >>> layer_status(persistence_tests(np.array([[0.5]] * 12)), 0.05)
    'agree'
    """
    measured = tests.steps > 0
    if not measured.any():
        return "n/a"
    if tests.persistent(alpha).any():
        return "conflict"
    if tests.undetermined(alpha).any():
        return "undetermined"
    if tests.agreeing(alpha)[measured].all():
        return "agree"
    return "oscillating" if tests.at_chance(alpha).any() else "calm"


def order_layers(
    names: Iterable[str], *, model: nn.Module | None = None, layer_order: Sequence[str] | None = None
) -> list[str]:
    """Layer names from the bottom of the network to the top.

    ``layer_order`` (an explicit list) wins; otherwise, with a ``model``, the order of ``model.named_modules()``
    (:func:`~gradconflict.measure.shared.layer_ranks`, the order the monitor reports them in); otherwise the order
    of ``names`` (a run's layers come bottom to top: :attr:`Aligned.layers
    <gradconflict.diagnosis.aligned.Aligned.layers>`). Names that the first two do not know come last, in the
    order of ``names``.

    >>> order_layers(["neck", "stem", "body"], layer_order=["stem", "body"])
    ['stem', 'body', 'neck']
    """
    names = list(dict.fromkeys(names))
    if layer_order is not None:
        rank = {n: k for k, n in enumerate(dict.fromkeys(layer_order))}
    elif model is not None:
        rank = layer_ranks(layer_names(model)[1])
    else:
        return names
    known = sorted((n for n in names if n in rank), key=rank.__getitem__)
    return known + [n for n in names if n not in rank]


@dataclass(frozen=True)
class LayerProfile:
    """The conflict of one layer over a run.

    Attributes:
        name: layer name.
        num_params: shared parameter entries in the layer.
        steps: measured steps that include this layer.
        score: Recon's S-conflict score over the run: conflicting pairs summed over steps.
        persistence: T x T (upper triangle; 0 below it) share of the steps carrying both tasks on which the pair
            conflicts; NaN for a pair never measured together.
        mean_cosine: T x T mean cosine of each pair over the steps carrying both tasks (NaN: never together).
        together: T x T number of steps that carried both tasks on this layer (the diagonal: that carried the
            task); ``None`` when unknown.
        tests: each pair's test against chance (pairs ``i < j`` in row order; see
            :mod:`~gradconflict.diagnosis.persistence`).
        status: the layer's status (see the module docstring).
        worst: the position in ``tests`` of the pair whose conflict is the most significant.
    """

    name: str
    num_params: int
    steps: int
    score: int
    persistence: np.ndarray
    mean_cosine: np.ndarray
    together: np.ndarray | None = None
    tests: PersistenceTests | None = None
    status: LayerStatus = "n/a"
    worst: int = 0

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
        alpha: the significance level of the tests.
    """

    tasks: tuple[str, ...]
    layers: list[LayerProfile]
    branch_point: str | None
    duplicated_share: float
    alpha: float

    @property
    def threshold(self) -> float:
        """The smallest conflict rate that can count as persistent (Cohen's small effect above chance, 0.6): a
        layer's worst pair conflicts persistently only from there, and only when significant and strong enough."""
        return PERSISTENT_RATE

    def worst_pair(self, layer: LayerProfile) -> tuple[int, int] | None:
        """``(i, j)`` of the pair whose conflict is the most significant on ``layer`` (:attr:`LayerProfile.worst`),
        ``None`` when no pair was measured together on it."""
        pairs = [(i, j) for i in range(len(self.tasks)) for j in range(i + 1, len(self.tasks))]
        if pairs and layer.tests is not None and layer.tests.steps[layer.worst] > 0:
            return pairs[layer.worst]
        return None

    def table(self) -> str:
        """A plain-text table, bottom layer first: parameters, Recon's score, the pair whose conflict is the
        most significant with its persistence, mean cosine and adjusted p-value, and the layer's status (``-`` on a
        layer where no pair was measured together)."""
        head = f"{'layer':<28} {'params':>9} {'score':>7} {'worst pair':<16} {'persist':>7} {'mean cos':>8}"
        lines = [f"{head} {'p (adj.)':>9}  status"]
        for layer in self.layers:
            worst = self.worst_pair(layer)
            if worst is not None and layer.tests is not None:
                i, j = worst
                pair = pair_key(self.tasks[i], self.tasks[j])
                persist, cos = f"{float(layer.persistence[i, j]):>7.2f}", f"{float(layer.mean_cosine[i, j]):>+8.2f}"
                p = f"{float(layer.tests.p_adjusted[layer.worst]):>9.2g}"
            else:
                pair, persist, cos, p = "-", f"{'-':>7}", f"{'-':>8}", f"{'-':>9}"
            mark = "  <- branch" if layer.name == self.branch_point else ""
            lines.append(
                f"{layer.name:<28} {layer.num_params:>9} {layer.score:>7} {pair:<16} {persist} {cos} {p}  "
                f"{layer.status}{mark}"
            )
        return "\n".join(lines)


def branch_point(layers: Sequence[LayerProfile]) -> str | None:
    """The shallowest layer whose status is ``"conflict"``, unless every layer above it agrees; ``None`` when
    there is no such layer. ``layers`` go bottom to top.

    >>> def lp(name, status):
    ...     return LayerProfile(name, 1, 1, 0, np.zeros((2, 2)), np.zeros((2, 2)), status=status)
    >>> branch_point([lp("a", "agree"), lp("b", "conflict"), lp("c", "undetermined")])
    'b'
    >>> branch_point([lp("a", "conflict"), lp("b", "agree")]) is None     # confined below agreeing layers
    True
    """
    for k, layer in enumerate(layers):
        above = [lp.status for lp in layers[k + 1 :]]
        if layer.status == "conflict" and not (above and all(s == "agree" for s in above)):
            return layer.name
    return None


def layer_profile(
    history: Run,
    *,
    model: nn.Module | None = None,
    layer_order: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    tests: ConflictTests | None = None,
) -> Profile:
    """The :class:`Profile` of the measured steps of a run (layers ordered by :func:`order_layers`; tasks in
    sorted order, each pair over the steps that carried both tasks). ``tests`` are the run's
    :func:`~gradconflict.diagnosis.conflicts.conflict_tests`, computed here when not given."""
    th = thresholds or Thresholds()
    aligned = align(history)
    if not aligned.num_steps:
        raise ValueError("the history has no measured step: nothing to profile")
    tests = tests if tests is not None else conflict_tests(aligned, th.conflict_cosine, th.alpha)
    T = len(aligned.tasks)
    iu = np.triu_indices(T, 1)
    score = tests.layer_scores
    steps = aligned.layer_present.sum(0)
    index = {n: k for k, n in enumerate(aligned.layers)}
    profiles = []
    for name in order_layers(aligned.layers, model=model, layer_order=layer_order):
        k = index[name]
        t = tests.by_layer[k]
        together = np.zeros((T, T), dtype=np.int64)
        together[iu] = t.steps
        together = together + together.T
        present = aligned.layer_present[:, k, None] & aligned.present
        np.fill_diagonal(together, present.sum(0))
        persistence, mean_cosine = np.zeros((T, T)), np.full((T, T), np.nan)
        persistence[iu] = t.persistence
        mean_cosine[iu] = t.mean_cosine
        mean_cosine.T[iu] = t.mean_cosine
        np.fill_diagonal(mean_cosine, np.where(together.diagonal() > 0, 1.0, np.nan))
        profiles.append(
            LayerProfile(
                name=name, num_params=int(aligned.layer_params[k]), steps=int(steps[k]), score=int(score[k]),
                persistence=persistence, mean_cosine=mean_cosine, together=together, tests=t,
                status=layer_status(t, th.alpha), worst=worst_test(t),
            )
        )
    branch = branch_point(profiles)
    start = None if branch is None else [p.name for p in profiles].index(branch)
    return Profile(aligned.tasks, profiles, branch, share_from(profiles, start), th.alpha)


def share_from(layers: Sequence[LayerProfile], start: int | None) -> float:
    """The share of the layers' parameters at and above position ``start`` (0 for ``None``): what a branch there
    duplicates."""
    total = sum(lp.num_params for lp in layers)
    if start is None or not total:
        return 0.0
    return sum(lp.num_params for lp in layers[start:]) / total
