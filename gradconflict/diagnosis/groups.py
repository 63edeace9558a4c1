"""Task groups: partition the tasks so that tasks that help each other share a backbone.

The score of a partition follows TAG's: each task ``j`` receives the mean affinity ``N_ij`` from the other
members ``i`` of its group (0 when it is alone), and the partition's score is the mean over tasks. Up to
:data:`EXHAUSTIVE_MAX` tasks every partition is scored; above that, scipy's average-linkage hierarchical
clustering of the symmetrised affinity proposes one partition per number of groups.

>>> import numpy as np
>>> N = np.array([[1, .9, -1, -1], [.9, 1, -1, -1], [-1, -1, 1, .8], [-1, -1, .8, 1]])
>>> g = group_tasks(N, ["a", "b", "c", "d"])
>>> g.groups, round(g.score, 2)
([['a', 'b'], ['c', 'd']], 0.85)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

__all__ = ["EXHAUSTIVE_MAX", "Grouping", "group_tasks", "magnitude_free", "partition_scores", "set_partitions"]

#: Largest number of tasks whose partitions are searched exhaustively (Bell(10) = 115,975 partitions).
EXHAUSTIVE_MAX = 10


def set_partitions(n: int) -> Iterator[tuple[int, ...]]:
    """Every partition of ``n`` items, as restricted-growth label tuples (item ``k`` is in group ``labels[k]``).

    >>> list(set_partitions(3))
    [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, 2)]
    """
    def grow(prefix: tuple[int, ...], used: int) -> Iterator[tuple[int, ...]]:
        if len(prefix) == n:
            yield prefix
            return
        for label in range(used + 1):
            yield from grow((*prefix, label), max(used, label + 1))

    yield from grow((), 0) if n else iter([()])


def partition_scores(affinity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Scores of many partitions at once: ``labels`` is ``[P, T]``; returns ``[P]``.

    Task ``j`` scores the mean of ``affinity[i, j]`` over the other members ``i`` of its group (0 alone).
    """
    same = labels[:, :, None] == labels[:, None, :]
    same &= ~np.eye(labels.shape[1], dtype=bool)[None]
    mates = same.sum(1)  # [P, T]: other members of task j's group
    received = np.einsum("pij,ij->pj", same, affinity)
    return np.where(mates > 0, received / np.maximum(mates, 1), 0.0).mean(1)


@dataclass(frozen=True)
class Grouping:
    """The chosen task groups and the best partition for each number of groups.

    Attributes:
        groups: the chosen partition (lists of task names, in task order).
        score: its score.
        by_count: number of groups -> (best partition with that many groups, its score).
        method: ``"exhaustive"`` or ``"hierarchical"``.
    """

    groups: list[list[str]]
    score: float
    by_count: dict[int, tuple[list[list[str]], float]]
    method: str


def _as_groups(labels: Sequence[int], tasks: Sequence[str]) -> list[list[str]]:
    order = list(dict.fromkeys(labels))  # groups in order of their first task
    return [[t for t, lab in zip(tasks, labels) if lab == g] for g in order]


def magnitude_free(affinity: np.ndarray) -> np.ndarray:
    """The geometric mean of the two directed affinities, ``sign(N_ij + N_ji) sqrt(|N_ij N_ji|)`` (1 on the
    diagonal): the grouping's affinity, free of the tasks' gradient magnitudes.

    The normalised first-order affinity ``N_ij = G_ij / G_jj`` carries the norm ratio ``|g_i| / |g_j|``: a task
    with a large gradient "helps" every small one and is helped by none, and a partition's score then follows who
    is large rather than who agrees (three aligned tasks with norms 1, 5 and 0.3 split into ``[a] | [b, c]``). The
    product ``N_ij N_ji = cos^2`` cancels the ratio, so the geometric mean is the cosine for the first-order
    affinity; dominating magnitudes are the ``magnitude_dominance`` signal's business, cured by a re-weighting.

    >>> N = np.array([[1.0, 0.18], [4.5, 1.0]])   # cosine 0.9, norms 1 and 5
    >>> magnitude_free(N).round(2).tolist()
    [[1.0, 0.9], [0.9, 1.0]]
    """
    A = np.asarray(affinity, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = np.sign(A + A.T) * np.sqrt(np.abs(A * A.T))
    np.fill_diagonal(out, 1.0)
    return out


def group_tasks(
    affinity: np.ndarray,
    tasks: Sequence[str],
    *,
    max_groups: int | None = None,
    tolerance: float = 0.05,
    min_groups: int = 1,
) -> Grouping:
    """Best partition of ``tasks`` into ``min_groups``..``max_groups`` groups under ``affinity`` (``N_ij``: i onto
    j); ``by_count`` still holds the best partition for every number of groups.

    Among the partitions scoring within ``tolerance`` of the best one, the one with the fewest groups wins
    (sharing is the default), then the higher score. ``min_groups=2`` asks for a split (when the diagnosis has
    decided to split, the question is only into which groups). A NaN affinity (a pair never measured together) counts as
    0: no evidence either way. Groups keep the order of ``tasks`` (pass them sorted, as
    :func:`~gradconflict.diagnosis.advise` does, for groups that do not depend on the order of the losses dict).
    """
    T = len(tasks)
    k_max = min(max_groups or T, T)
    A = np.nan_to_num(np.asarray(affinity, dtype=np.float64), nan=0.0)
    if T <= EXHAUSTIVE_MAX:
        labels = np.array(list(set_partitions(T)), dtype=np.int64).reshape(-1, T)
        labels = labels[labels.max(1) + 1 <= k_max]
        method = "exhaustive"
    else:
        sym = np.clip((A + A.T) / 2, -1.0, 1.0)
        distance = 1.0 - sym
        np.fill_diagonal(distance, 0.0)
        tree = hierarchy.linkage(squareform(distance, checks=False), method="average")
        labels = np.stack([hierarchy.fcluster(tree, k, criterion="maxclust") - 1 for k in range(1, k_max + 1)])
        method = "hierarchical"
    scores = partition_scores(A, labels)
    counts = np.array([len(set(row.tolist())) for row in labels])
    by_count: dict[int, tuple[list[list[str]], float]] = {}
    for k in sorted(set(counts.tolist())):
        best = int(np.flatnonzero(counts == k)[np.argmax(scores[counts == k])])
        by_count[k] = (_as_groups(labels[best].tolist(), tasks), float(scores[best]))
    allowed = {k: v for k, v in by_count.items() if k >= min(min_groups, max(by_count))}
    top = max(score for _, score in allowed.values())
    k = min(k for k, (_, score) in allowed.items() if score >= top - tolerance)
    groups, score = by_count[k]
    return Grouping(groups, score, by_count, method)
