import numpy as np
import pytest
import torch

from gradconflict.diagnosis import group_tasks
from gradconflict.diagnosis.groups import magnitude_free, partition_scores, set_partitions


@pytest.mark.parametrize(("n", "bell"), [(0, 1), (1, 1), (3, 5), (4, 15), (6, 203)])
def test_set_partitions_counts_are_bell_numbers(n, bell):
    parts = list(set_partitions(n))
    assert len(parts) == bell == len(set(parts))


def test_partition_scores():
    A = np.array([[1.0, 0.5, -1.0], [0.3, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    labels = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 2]])
    together = ((0.3 - 1.0) / 2 + (0.5 - 1.0) / 2 + (-1.0 - 1.0) / 2) / 3
    assert partition_scores(A, labels) == pytest.approx([together, (0.3 + 0.5) / 3, 0.0])


def _block(sizes, within=0.9, across=-0.8):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    A = np.where(labels[:, None] == labels[None, :], within, across)
    np.fill_diagonal(A, 1.0)
    return A


def test_two_clear_groups_any_task_order():
    A = _block([2, 2])
    perm = [2, 0, 3, 1]
    tasks = ["c", "a", "d", "b"]
    g = group_tasks(A[np.ix_(perm, perm)], tasks)
    assert g.method == "exhaustive"
    assert sorted(map(sorted, g.groups)) == [["a", "b"], ["c", "d"]]
    assert set(g.by_count) == {1, 2, 3, 4} and g.by_count[2][1] == pytest.approx(0.9)


def test_aligned_tasks_stay_together_and_opposed_split():
    assert group_tasks(_block([3]), list("abc")).groups == [["a", "b", "c"]]
    assert group_tasks(np.array([[1.0, -1.0], [-1.0, 1.0]]), ["a", "b"]).groups == [["a"], ["b"]]


def test_tolerance_prefers_fewer_groups_and_max_groups_caps():
    A = np.array([[1.0, 0.02], [0.02, 1.0]])
    assert group_tasks(A, ["a", "b"]).groups == [["a", "b"]]
    A = np.array([[1.0, -0.02], [-0.02, 1.0]])  # splitting gains 0.02 < tolerance
    assert group_tasks(A, ["a", "b"]).groups == [["a", "b"]]
    assert group_tasks(A, ["a", "b"], tolerance=0.0).groups == [["a"], ["b"]]
    assert set(group_tasks(_block([2, 2]), list("abcd"), max_groups=1).by_count) == {1}


def test_hierarchical_above_ten_tasks():
    A = _block([4, 4, 4])
    tasks = [f"t{k}" for k in range(12)]
    g = group_tasks(A, tasks)
    assert g.method == "hierarchical"
    assert g.groups == [tasks[0:4], tasks[4:8], tasks[8:12]]


def test_unknown_affinity_counts_as_neutral():
    # c never met a or b: its affinities are NaN. a and b help each other: they share, c is left alone.
    A = np.array([[1.0, 0.6, np.nan], [0.6, 1.0, np.nan], [np.nan, np.nan, 1.0]])
    g = group_tasks(A, ["a", "b", "c"])
    assert g.groups == [["a", "b"], ["c"]]
    assert g.by_count[2] == ([["a", "b"], ["c"]], pytest.approx((0.6 + 0.6 + 0.0) / 3))
    assert g.by_count[1][1] == pytest.approx((0.3 + 0.3 + 0.0) / 3)


def test_min_groups_asks_for_a_split():
    # Every pair helps a little: sharing wins; asked for a split, the best partition with two groups or more.
    N = np.array([[1.0, 0.3, 0.1], [0.3, 1.0, 0.1], [0.1, 0.1, 1.0]])
    assert group_tasks(N, ["a", "b", "c"]).groups == [["a", "b", "c"]]
    split = group_tasks(N, ["a", "b", "c"], min_groups=2)
    assert split.groups == [["a", "b"], ["c"]] and split.by_count[1][0] == [["a", "b", "c"]]


def _structured_run(structure, across, norms, steps=40, seed=0, dim=16):
    """Reports whose task gradients follow a group structure by construction: each task's gradient is its group's
    direction plus noise, scaled to its norm; group directions have pairwise cosine ``across``."""
    from gradconflict import ConflictReport, LayerReport

    rng = np.random.default_rng(seed)
    tasks = "".join(sorted(t for g in structure for t in g))
    k = len(structure)
    cos = np.full((k, k), across)
    np.fill_diagonal(cos, 1.0)
    directions = np.zeros((k, dim))
    directions[:, :k] = np.linalg.cholesky(cos)
    reports = []
    for s in range(steps):
        rows = []
        for t in tasks:
            v = directions[next(g for g, grp in enumerate(structure) if t in grp)] + 0.3 * rng.standard_normal(dim) / 4
            rows.append(norms[t] * v / np.linalg.norm(v))
        G = torch.tensor(np.array(rows)) @ torch.tensor(np.array(rows)).T
        reports.append(ConflictReport(tasks, G, losses=torch.ones(len(tasks), dtype=torch.float64),
                                      layers={"body.0": LayerReport("body.0", tasks, G, num_params=10)}, step=s))
    return reports


@pytest.mark.parametrize("structure, across", [
    ([["a", "b"], ["c"]], -0.6),                        # a pair and a single
    ([["a", "b", "c"], ["d"]], -0.6),                   # a triple and a single
    ([["a", "b"], ["c", "d"]], -0.9),                   # two opposed pairs
    ([["a", "b"], ["c", "d"], ["e", "f"]], -0.4),       # three pairs
])
@pytest.mark.parametrize("scaled", [False, True])
def test_groups_follow_the_constructed_structure(structure, across, scaled):
    from gradconflict.diagnosis import advise

    tasks = sorted(t for g in structure for t in g)
    scales = [1.0, 5.0, 0.3, 2.0, 1.0, 3.0]  # gradient norms unrelated to the groups: they must not matter
    norms = {t: scales[k] if scaled else 1.0 for k, t in enumerate(tasks)}
    advice = advise(_structured_run(structure, across, norms), layer_order=["body.0"])
    assert advice.verdict == "physical_split" and advice.groups == structure


def test_magnitude_free_is_the_cosine_for_first_order_affinities():
    # Independent reference: the cosines of explicit gradients, against N_ij = G_ij / G_jj of their Gram.
    rng = np.random.default_rng(1)
    g = rng.standard_normal((4, 7)) * np.array([[1.0], [10.0], [0.1], [3.0]])
    G = g @ g.T
    cos = G / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(g, axis=1))
    assert np.allclose(magnitude_free(G / np.diag(G)[None, :]), cos)
