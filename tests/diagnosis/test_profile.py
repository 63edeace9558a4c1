import numpy as np
import pytest
from torch import nn

from gradconflict.diagnosis import Thresholds, layer_profile, order_layers
from gradconflict.diagnosis.profile import LayerProfile, branch_point


def test_order_layers_explicit_model_and_natural():
    names = ["backbone.10", "backbone.2", "backbone.0", "stem"]
    assert order_layers(names) == ["backbone.0", "backbone.2", "backbone.10", "stem"]
    explicit = order_layers(names, layer_order=["stem", "backbone.0"])
    assert explicit == ["stem", "backbone.0", "backbone.2", "backbone.10"]
    model = nn.Module()
    model.stem = nn.Linear(2, 2)
    model.backbone = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    assert order_layers(names, model=model) == ["stem", "backbone.0", "backbone.2", "backbone.10"]


def _layer(name, worst, params=10):
    return LayerProfile(name, params, 10, 0, np.array([[0.0, worst], [0.0, 0.0]]), np.eye(2))


@pytest.mark.parametrize(
    ("worst", "expected"),
    [
        ([0.0, 0.1, 0.9, 0.9], "l2"),
        ([0.0, 0.1, 0.9, 0.3], "l2"),  # a weaker layer above a conflicting one is still duplicated
        ([0.9, 0.0, 0.0, 0.0], None),  # conflict only at the bottom, the layers above agree: no branch
        ([1.0, 1.0, 1.0, 1.0], "l0"),
        ([0.0, 0.0, 0.0, 0.0], None),
        ([0.0, 0.0, 0.0, 0.6], "l3"),
    ],
)
def test_branch_point_rule(worst, expected):
    layers = [_layer(f"l{k}", w) for k, w in enumerate(worst)]
    assert branch_point(layers, 0.5) == expected


def test_layer_profile_scores_cosines_and_share(make_report, make_pair):
    reports = []
    for s in range(10):
        top = make_pair(-0.5 if s < 8 else 0.5)  # conflicts on 8 of 10 steps
        bottom = make_pair(0.7)
        reports.append(
            make_report(top + bottom, step=s, layers={"net.1": (top, 30), "net.0": (bottom, 90)})
        )
    p = layer_profile(reports)
    assert [lp.name for lp in p.layers] == ["net.0", "net.1"]
    top = p.layers[1]
    assert top.score == 8 and top.steps == 10 and top.worst_persistence == pytest.approx(0.8)
    assert top.mean_cosine[0, 1] == pytest.approx(-0.3)
    assert p.layers[0].score == 0 and p.layers[0].mean_cosine[0, 1] == pytest.approx(0.7)
    assert p.branch_point == "net.1" and p.duplicated_share == pytest.approx(0.25)
    assert "<- branch" in p.table().splitlines()[2]
    strict = layer_profile(reports, thresholds=Thresholds(layer_conflict=0.9))
    assert strict.branch_point is None and strict.duplicated_share == 0.0


def test_layer_profile_threshold_s_and_four_tasks(make_report, make_gram):
    cos = [[1, 0.9, -0.05, -0.05], [0.9, 1, -0.05, -0.05], [-0.05, -0.05, 1, 0.9], [-0.05, -0.05, 0.9, 1]]
    G = make_gram(cos)
    reports = [make_report(G, step=s, layers={"x": (G, 4)}) for s in range(3)]
    assert layer_profile(reports).layers[0].score == 4 * 3  # four cross pairs conflict at S = 0
    recon = layer_profile(reports, thresholds=Thresholds(conflict_cosine=-0.1))
    assert recon.layers[0].score == 0 and recon.branch_point is None


def test_layer_profile_needs_a_measured_step():
    with pytest.raises(ValueError, match="no measured step"):
        layer_profile([])


def test_worst_pair_ignores_the_diagonal_and_breaks_ties_by_cosine(make_report, make_gram):
    from gradconflict.diagnosis.profile import worst_pair

    cos = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, -0.3], [0.2, -0.3, 1.0]])
    assert worst_pair(np.zeros((3, 3)), cos) == (1, 2)
    persistence = np.zeros((3, 3))
    persistence[0, 2] = 0.4
    assert worst_pair(persistence, cos) == (0, 2)
    G = make_gram(cos.tolist())
    p = layer_profile([make_report(G, layers={"x": (G, 1)})])
    assert "b/c" in p.table()


def test_layer_profile_judges_each_pair_where_both_tasks_are_present(make_cut, make_gram):
    # "top": a/b on all 8 steps (cosine +0.5); c with a on 4 steps, (a, c) at -0.5 on 3 of them and +0.5 on one.
    # "extra" only exists on c's steps. Tasks are listed in a different order on c's steps.
    run = []
    for s in range(8):
        ac = -0.5 if s in (1, 3, 5) else 0.5
        G = make_gram([[1.0, 0.5, ac], [0.5, 1.0, 0.0], [ac, 0.0, 1.0]])
        with_c = s % 2 == 1
        layers = {"top": (G, 10), **({"extra": (G, 5)} if with_c else {})}
        run.append(make_cut("cba" if with_c else "ab", G, step=s, tasks="abc", layers=layers))
    p = layer_profile(run, layer_order=["top", "extra"])
    top, extra = p.layers
    assert p.tasks == ("a", "b", "c")
    assert (top.steps, extra.steps) == (8, 4)
    assert top.together.tolist() == [[8, 8, 4], [8, 8, 4], [4, 4, 4]]
    assert top.persistence[0, 2] == pytest.approx(3 / 4) and top.persistence[0, 1] == 0.0
    assert top.mean_cosine[0, 2] == pytest.approx((3 * -0.5 + 0.5) / 4)
    assert top.score == 3 and extra.score == 3 and extra.worst_persistence == pytest.approx(3 / 4)
    assert p.branch_point == "top"


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
    assert np.isnan(solo.worst_persistence) and solo.score == 0
    # The unmeasured layer above does not pull the average down: the branch point is still x.
    assert p.branch_point == "x"
    rows = p.table().splitlines()
    assert "a/b" in rows[1] and rows[2].split()[3:] == ["-", "-", "-"]


def test_branch_point_skips_layers_without_a_measured_pair():
    layers = [_layer("l0", 0.0), _layer("l1", 0.9), _layer("l2", float("nan")), _layer("l3", 0.2)]
    assert branch_point(layers, 0.5) == "l1"  # mean over l1 and l3: 0.55
    assert branch_point([_layer("l0", float("nan"))], 0.5) is None
