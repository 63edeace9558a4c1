import numpy as np
import pytest

from gradconflict.diagnosis import group_tasks
from gradconflict.diagnosis.groups import partition_scores, set_partitions


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
