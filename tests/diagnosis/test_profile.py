import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from gradconflict.diagnosis import Thresholds, layer_profile, order_layers
from gradconflict.diagnosis.profile import LayerProfile, branch_point, worst_pair


def test_order_layers_explicit_then_model_then_as_given():
    names = ["backbone.10", "backbone.2", "backbone.0", "stem"]
    assert order_layers(names + ["stem"]) == names  # no order known: the run's own (a report lists bottom to top)
    explicit = order_layers(names, layer_order=["stem", "backbone.0"])
    assert explicit == ["stem", "backbone.0", "backbone.10", "backbone.2"]  # the names it does not know: as given
    model = nn.Module()
    model.stem = nn.Linear(2, 2)
    model.backbone = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    assert order_layers(names, model=model) == ["stem", "backbone.0", "backbone.2", "backbone.10"]
    model.weight = nn.Parameter(torch.ones(1))  # the model's own parameters are the first module's: "(root)"
    assert order_layers(["stem", "(root)", "head"], model=model) == ["(root)", "stem", "head"]


def _layer(name, status, params=10):
    return LayerProfile(name, params, 10, 0, np.zeros((2, 2)), np.eye(2), status=status)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["agree", "undetermined", "conflict", "conflict"], "l2"),
        (["agree", "calm", "conflict", "calm"], "l2"),  # a weaker layer above a conflicting one is still duplicated
        (["conflict", "agree", "agree", "agree"], None),  # conflict only at the bottom, the layers above agree
        (["conflict", "conflict", "conflict", "conflict"], "l0"),
        (["agree", "agree", "oscillating", "undetermined"], None),
        (["agree", "agree", "agree", "conflict"], "l3"),  # conflict confined to the top: branch there
        (["conflict", "agree", "n/a", "undetermined"], "l0"),
    ],
)
def test_branch_point_rule(statuses, expected):
    layers = [_layer(f"l{k}", s) for k, s in enumerate(statuses)]
    assert branch_point(layers) == expected


def _interleaved(conflicts: int, steps: int) -> list[bool]:
    """``conflicts`` conflicting steps spread evenly over ``steps`` (no runs of either sign)."""
    return [int((s + 1) * conflicts / steps) > int(s * conflicts / steps) for s in range(steps)]


def test_layer_profile_scores_tests_cosines_and_share(make_report, make_pair):
    # The top layer conflicts on 24 of 30 steps, spread evenly; the bottom one always agrees, and dominates the
    # whole backbone's Gram.
    fights = _interleaved(24, 30)
    reports = []
    for s, fight in enumerate(fights):
        top = make_pair(-0.5 if fight else 0.5)
        bottom = make_pair(0.7, norms=(3.0, 3.0))
        reports.append(make_report(top + bottom, step=s, layers={"net.0": (bottom, 90), "net.1": (top, 30)}))
    p = layer_profile(reports)
    assert [lp.name for lp in p.layers] == ["net.0", "net.1"]
    bottom, top = p.layers
    assert top.score == 24 and top.steps == 30 and top.worst_persistence == pytest.approx(0.8)
    assert top.mean_cosine[0, 1] == pytest.approx((24 * -0.5 + 6 * 0.5) / 30)
    assert bottom.score == 0 and bottom.mean_cosine[0, 1] == pytest.approx(0.7)
    # Evenly spread signs show no positive dependence: the raw p-value is scipy's exact one-sided binomial test,
    # and the Benjamini-Hochberg adjustment covers the three tests (the whole backbone's pair and each layer's).
    assert top.tests.tau[0] == 1.0
    raw = stats.binomtest(24, 30, 0.5, alternative="greater").pvalue
    assert top.tests.p_conflict[0] == pytest.approx(raw)
    family = [1.0, raw, stats.binomtest(0, 30, 0.5, alternative="greater").pvalue]  # whole, net.1, net.0
    assert top.tests.p_adjusted[0] == pytest.approx(stats.false_discovery_control(family, method="bh")[1])
    assert (top.status, bottom.status) == ("conflict", "agree")
    assert p.branch_point == "net.1" and p.duplicated_share == pytest.approx(0.25)
    assert p.worst_pair(top) == (0, 1)
    row = p.table().splitlines()[2]  # the table renders those fields
    assert row.split()[0] == "net.1" and row.split()[3] == "a/b" and row.endswith("conflict  <- branch")
    strict = layer_profile(reports, thresholds=Thresholds(alpha=raw / 10))  # a level this conflict cannot meet
    assert strict.layers[1].status == "undetermined" and strict.branch_point is None


def test_too_few_steps_are_undetermined_not_guessed(make_report, make_pair):
    # 4 conflicts in 5 steps: P(X >= 4 | 5, 1/2) = 6/32, no evidence either way yet.
    reports = [
        make_report(make_pair(c), step=s, layers={"x": (make_pair(c), 1)})
        for s, c in enumerate([-0.5, -0.5, 0.5, -0.5, -0.5])
    ]
    p = layer_profile(reports)
    assert p.layers[0].status == "undetermined" and p.branch_point is None
    assert 0 < p.layers[0].tests.steps_needed[0] < np.inf


def test_layer_profile_threshold_s_and_four_tasks(make_report, make_gram):
    cos = [[1, 0.9, -0.05, -0.05], [0.9, 1, -0.05, -0.05], [-0.05, -0.05, 1, 0.9], [-0.05, -0.05, 0.9, 1]]
    G = make_gram(cos)
    reports = [make_report(G, step=s, layers={"x": (G, 4)}) for s in range(3)]
    assert layer_profile(reports).layers[0].score == 4 * 3  # four cross pairs conflict at S = 0
    recon = layer_profile(reports, thresholds=Thresholds(conflict_cosine=-0.1))
    assert recon.layers[0].score == 0 and recon.branch_point is None
    # With S = -0.1 the cosines of -0.05 fall in the dead zone: they neither conflict nor agree.
    assert recon.layers[0].tests.conflicts.tolist() == [0] * 6
    assert recon.layers[0].tests.agreements.tolist() == [3, 0, 0, 0, 0, 3]


def test_layer_profile_needs_a_measured_step():
    with pytest.raises(ValueError, match="no measured step"):
        layer_profile([])


def test_worst_pair_ignores_the_diagonal_and_breaks_ties_by_cosine(make_report, make_gram):
    cos = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, -0.3], [0.2, -0.3, 1.0]])
    assert worst_pair(np.zeros((3, 3)), cos) == (1, 2)
    persistence = np.zeros((3, 3))
    persistence[0, 2] = 0.4
    assert worst_pair(persistence, cos) == (0, 2)
    G = make_gram(cos.tolist())
    p = layer_profile([make_report(G, layers={"x": (G, 1)})])
    assert p.worst_pair(p.layers[0]) == (1, 2)  # b/c: the lowest mean cosine, on the one step


def test_layer_profile_judges_each_pair_where_both_tasks_are_present(make_cut, make_gram):
    # "top": a/b on all 8 steps (cosine +0.5); c with a on 4 steps, (a, c) at -0.5 on 3 of them and +0.5 on one.
    # "extra" only exists on c's steps. Tasks are listed in a different order on c's steps.
    run = []
    for s in range(8):
        ac = -0.5 if s in (1, 3, 7) else 0.5
        G = make_gram([[1.0, 0.5, ac], [0.5, 1.0, 0.0], [ac, 0.0, 1.0]])
        with_c = s % 2 == 1
        layers = {"top": (G, 10), **({"extra": (G, 5)} if with_c else {})}
        run.append(make_cut("cba" if with_c else "ab", G, step=s, tasks="abc", layers=layers))
    p = layer_profile(run, layer_order=["top", "extra"])
    top, extra = p.layers
    assert p.tasks == ("a", "b", "c")
    assert (top.steps, extra.steps) == (8, 4)
    assert top.together.tolist() == [[8, 8, 4], [8, 8, 4], [4, 4, 4]]
    assert top.tests.steps.tolist() == [8, 4, 4]
    assert top.persistence[0, 2] == pytest.approx(3 / 4) and top.persistence[0, 1] == 0.0
    assert top.mean_cosine[0, 2] == pytest.approx((3 * -0.5 + 0.5) / 4)
    assert top.score == 3 and extra.score == 3 and extra.worst_persistence == pytest.approx(3 / 4)
    # Three conflicts in four steps is no evidence yet (P(X >= 3 | 4, 1/2) = 5/16): no branch point.
    assert top.status == "undetermined" and p.branch_point is None


def test_pairs_and_layers_never_measured(make_cut, make_gram):
    G = make_gram([[1.0, -0.5, 0.2], [-0.5, 1.0, 0.0], [0.2, 0.0, 1.0]])
    # b and c never meet; "solo" only ever carries one task.
    run = [
        make_cut("ab" if s % 2 else "ac", G, step=s, tasks="abc", layers={"x": (G, 3)}) for s in range(4)
    ] + [make_cut("b", G, step=4 + s, tasks="abc", layers={"solo": (G, 3)}) for s in range(2)]
    p = layer_profile(run, layer_order=["x", "solo"])
    x, solo = p.layers
    assert np.isnan(x.persistence[1, 2]) and np.isnan(x.mean_cosine[1, 2])
    assert x.persistence[0, 1] == 1.0 and x.worst_persistence == 1.0
    assert x.tests.steps.tolist() == [2, 2, 0]
    assert np.isnan(solo.worst_persistence) and solo.score == 0 and solo.status == "n/a"
    assert p.worst_pair(x) == (0, 1) and p.worst_pair(solo) is None
    rows = p.table().splitlines()
    assert rows[1].split()[3] == "a/b" and rows[2].split()[3:7] == ["-", "-", "-", "-"]
