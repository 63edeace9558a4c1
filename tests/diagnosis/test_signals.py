import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from gradconflict.diagnosis import (
    Thresholds,
    ceiling,
    diverging_objectives,
    heavy_heads,
    oscillating_conflict,
    single_point_of_risk,
    zero_sum,
)
from gradconflict.diagnosis.aligned import align, no_pair_reason
from gradconflict.diagnosis.signals import STATUSES, worst_status
from gradconflict.records.comparison import IdenticalSeedsWarning
from gradconflict.split import ComparisonResult, VariantRecord


def _run(make_report, grams, **kw):
    return [make_report(G, step=s, **kw) for s, G in enumerate(grams)]


def _spread(conflicts, steps, fight, calm):
    """``steps`` values, ``conflicts`` of them ``fight`` spread evenly, the others ``calm``."""
    return [fight if int((k + 1) * conflicts / steps) > int(k * conflicts / steps) else calm for k in range(steps)]


def test_diverging_objectives_statuses(make_report, make_pair):
    aligned = diverging_objectives(_run(make_report, [make_pair(0.8)] * 20))
    assert aligned.status == "ok" and aligned.value == 0.0 and aligned.finding.outcome == "ruled_out"
    # Opposed on 24 of 30 steps, spread evenly: P(X >= 24 | 30, 1/2) is far below 5% -> a persistent conflict.
    mixed = _spread(24, 30, make_pair(-0.9), make_pair(0.2))
    s = diverging_objectives(_run(make_report, mixed))
    assert s.status == "split" and s.value == pytest.approx(0.8) and s.statistic == "persistence"
    f = s.finding
    assert (f.pair, f.layer, f.steps, f.conflicts, f.outcome) == (("a", "b"), None, 30, 24, "persistent")
    assert s.pairs == (("a", "b"),) and s.layers == ()
    assert s.details["persistence"] == {"a/b": pytest.approx(0.8)}
    # Every step decided: a sign series whose autocorrelation time is 1 (evenly spread), so the raw p-value is the
    # binomial test's; with a single test in the family the adjustment leaves it as it is.
    tail = stats.binomtest(24, 30, 0.5, alternative="greater").pvalue
    assert f.tau == 1.0 and f.p_value == pytest.approx(tail) and s.p_value == pytest.approx(tail)
    assert s.effect == pytest.approx(2 * math.asin(math.sqrt(0.8)) - 2 * math.asin(math.sqrt(0.5)))
    assert s.details["decisive"]["p_value"] == pytest.approx(tail)
    # The same rate on 5 steps is not evidence yet: watch, with the number of steps still needed.
    few = diverging_objectives(_run(make_report, _spread(4, 5, make_pair(-0.9), make_pair(0.2))))
    assert few.status == "watch" and few.finding.outcome == "undetermined"
    assert 0 < few.finding.steps_needed < math.inf
    # A pair at chance level (conflicting on every other step) is ruled out, however many steps.
    coin = diverging_objectives(_run(make_report, [make_pair(c) for c in [-0.3, 0.3] * 40]))
    assert coin.status == "ok"
    # Negative on every step, but by a cosine of -0.05: nearly orthogonal gradients, weaker than a small
    # correlation (0.1), barely slow each other down: ruled out. Recon's S = -0.1 leaves nothing to test at all.
    mild = _run(make_report, [make_pair(-0.05)] * 30)
    assert diverging_objectives(mild).status == "ok"
    assert diverging_objectives(mild, Thresholds(conflict_cosine=-0.1)).status == "ok"
    clear = _run(make_report, [make_pair(-0.3)] * 30)
    assert diverging_objectives(clear).status == "split"
    assert diverging_objectives(clear, Thresholds(conflict_cosine=-0.5)).status == "ok"
    json.dumps(s.to_dict())


def test_conflict_confined_to_a_layer_drives_signal_one(make_report, make_pair):
    # The whole backbone agrees (the bottom layer dominates its Gram); the top layer conflicts on every step.
    run = []
    for step in range(20):
        top, bottom = make_pair(-0.8), make_pair(0.9, norms=(3.0, 3.0))
        run.append(make_report(top + bottom, step=step, layers={"bottom": (bottom, 50), "top": (top, 5)}))
    s = diverging_objectives(run)
    assert s.status == "split" and s.details["decisive"]["layer"] == "top"
    assert s.details["persistence"] == {"a/b": 0.0}  # the whole backbone never conflicts
    assert s.finding.layer == "top" and s.layers == ("top",) and s.pairs == (("a", "b"),)
    # one family: the pair on the whole backbone and on each of the two layers
    assert s.finding.family == s.details["tests"] == 3


def test_diverging_objectives_rising_conflict_is_watched(make_report, make_pair):
    grams = [make_pair(0.5)] * 16 + [make_pair(-0.1)] * 4  # conflict appears late: 20% of steps
    s = diverging_objectives(_run(make_report, grams))
    assert s.details["conflict_trend"]["rising"] and s.status == "watch"
    assert s.finding.outcome == "ruled_out"  # watched for the trend alone, not for an undecided pair


def test_oscillating_conflict_points_to_the_data(make_report, make_pair):
    rng = np.random.default_rng(0)
    coin = _run(make_report, [make_pair(float(c)) for c in rng.permutation([-0.4, 0.4] * 100)])  # 50%, shuffled
    s = oscillating_conflict(coin)
    assert s.status == "watch" and np.isnan(s.threshold) and s.statistic == "conflict_rate"
    assert s.pairs == (("a", "b"),) and s.finding.pair == ("a", "b") and s.p_value < 0.05
    assert s.value == pytest.approx(0.5) and s.effect == pytest.approx(0.0, abs=1e-12)  # 100 of 200: at chance
    assert s.to_dict()["threshold"] is None and s.to_dict()["pairs"] == [["a", "b"]]
    assert s.details["oscillating"] == ["a/b"] and 0.35 < s.details["flip_rate"]["a/b"] < 0.65
    persistent = oscillating_conflict(_run(make_report, [make_pair(-0.5)] * 40))
    assert persistent.status == "ok" and persistent.details["oscillating"] == []
    assert oscillating_conflict(_run(make_report, [make_pair(0.5)] * 40)).status == "ok"  # agreeing


def test_ceiling_reads_the_comparison_over_seeds():
    def rec(name, a):
        return VariantRecord(name, {"a": [1.0]}, [(1, {"a": a})], {"a": "min"})

    def runs(branched):
        return [
            ComparisonResult({"shared": rec("shared", s), "branched": rec("branched", b)}, ["a"], 1, 0,
                             branch_at="backbone.2")
            for s, b in zip([1.0, 0.9, 1.1], branched)
        ]

    lifted = ceiling(runs([0.5, 0.45, 0.55]))
    assert lifted.status == "split" and lifted.details["winners"] == ["branched"]
    assert lifted.details["branch_at"] == "backbone.2" and lifted.value == pytest.approx(50.0)
    flat = ceiling(runs([0.99, 0.89, 1.09]))  # 1% better: within the seeds' spread (10%)
    assert flat.status == "ok" and flat.details["winners"] == [] and flat.statistic == "delta_m"
    one = ceiling(runs([0.5, 0.45, 0.55])[0])
    assert one.status == "watch" and one.details["seeds"] == 1 and one.threshold == 1.0  # the paired test's floor
    assert ceiling(None).status == "n/a"


def test_ceiling_reads_one_comparison_per_seed_at_several_blocks_as_one_per_block():
    # The same per-seed records (the shared model 1.0, 1.2, 1.1; independent models equal to it; a copy at each
    # block with a planted gain) as one compare(branch_at=[...]) per seed and as one compare(branch_at=block) per
    # block and seed: the ceiling reads both alike.
    def rec(name, value):
        return VariantRecord(name, {"a": [1.0]}, [(1, {"a": value})], {"a": "min"})

    def both_shapes(gains):  # {block: per-seed gains in percent}
        shared = [1.0, 1.2, 1.1]
        base = [{"shared": rec("shared", s), "independent": rec("independent", s)} for s in shared]
        copies = [{b: rec(f"branched@{b}", s * (1 - g[k] / 100)) for b, g in gains.items()}
                  for k, s in enumerate(shared)]
        one_call = [ComparisonResult({**base[k], **{f"branched@{b}": c for b, c in copies[k].items()}}, ["a"], 1, 0,
                                     branch_at=list(gains), groups=[["a"]], seed=k) for k in range(3)]
        per_block = [ComparisonResult({**base[k], "branched": copies[k][b]}, ["a"], 1, 0, branch_at=b,
                                      groups=[["a"]], seed=k) for b in gains for k in range(3)]
        return ceiling(one_call), ceiling(per_block)

    def p_value(gains):  # scipy's one-sided t-test of the per-seed gains against the 1% floor
        return stats.ttest_1samp(gains, 1.0, alternative="greater").pvalue

    low, spread, high, flat = [20.0, 21.0, 19.0], [5.0, 70.0, 15.0], [30.0, 31.0, 29.0], [0.1, 0.2, 0.0]
    assert p_value(low) < 0.05 < p_value(spread)
    cases = {  # planted gains -> (status, block read)
        "a confirmed block beats a larger unconfirmed mean": ({"body.0": low, "body.1": spread}, "split", "body.0"),
        "the larger of two confirmed gains": ({"body.0": low, "body.1": high}, "split", "body.1"),
        "no block gains": ({"body.0": flat, "body.1": [-0.5, 0.3, 0.1]}, "ok", "body.0"),
    }
    for case, (gains, status, block) in cases.items():
        one_call, per_block = both_shapes(gains)
        assert (one_call.status, one_call.details["branch_at"]) == (status, block), case
        assert one_call.details == per_block.details and one_call.evidence == per_block.evidence, case
        assert (one_call.value, one_call.p_value) == (per_block.value, per_block.p_value), case
        assert one_call.details["winners"] == (["branched"] if status == "split" else []), case
        for b, planted in gains.items():
            got = one_call.details["by_block"][b]
            assert got["per_seed"] == pytest.approx(planted), case
            if sum(planted) / 3 > 1.0:  # above the floor on average: tested
                assert got["p_value"] == pytest.approx(p_value(planted)), case
            else:  # under it: no gain, whatever the test
                assert got["beyond"] is False, case
    # one point in a list: no grouping by block, the point read as the branch point
    single, _ = both_shapes({"body.1": high})
    assert single.details["by_block"] == {} and single.details["branch_at"] == "body.1" and single.status == "split"


def test_ceiling_paired_test_and_identical_seeds():
    def rec(name, a):
        return VariantRecord(name, {"a": [1.0]}, [(1, {"a": a})], {"a": "min"})

    def runs(shared, branched, seeds):
        return [
            ComparisonResult({"shared": rec("shared", s), "branched": rec("branched", b)}, ["a"], 1, 0, seed=k)
            for s, b, k in zip(shared, branched, seeds)
        ]

    # A consistent +25..29% gain, far inside a wide seed-to-seed variation of the shared model (1.0 vs 2.0):
    # the paired test sees it (scipy's one-sided t-test of the per-seed gains against the 1% floor as reference).
    shared = [1.0, 2.0, 1.5]
    gains = [25.5, 26.0, 29.4]
    consistent = ceiling(runs(shared, [s * (1 - g / 100) for s, g in zip(shared, gains)], [0, 1, 2]))
    reference = stats.ttest_1samp(gains, 1.0, alternative="greater").pvalue
    assert consistent.status == "split" and consistent.p_value == pytest.approx(reference, rel=1e-6)
    # A 0% gain on three seeds that changed nothing (the same seed): no evidence, so never "ok".
    with pytest.warns(IdenticalSeedsWarning):
        same = ceiling(runs([1.0] * 3, [1.0] * 3, [0, 0, 0]))
    assert same.status == "watch" and same.details["seeds_vary"] is False
    with pytest.warns(IdenticalSeedsWarning):
        lifted = ceiling(runs([1.0] * 3, [0.5] * 3, [0, 0, 0]))
    assert lifted.status == "watch" and lifted.details["winners"] == []


def test_signals_not_available_without_inputs(make_report):
    one_task = [make_report(torch.ones(1, 1, dtype=torch.float64))]
    assert diverging_objectives(one_task).status == "n/a"
    assert zero_sum(one_task).status == "n/a"
    assert single_point_of_risk(one_task).status == "n/a"
    assert single_point_of_risk([]).status == "n/a"
    s = heavy_heads(model=nn.Linear(2, 2))
    assert s.status == "n/a" and s.value is None and "heads=" in s.evidence
    assert "n/a" in str(s)


def test_heavy_heads_statuses():
    backbone = nn.Linear(8, 8)  # 72 parameters
    light = {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)}
    assert heavy_heads(heads=light, backbone=backbone).status == "ok"
    big = {"a": nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1)), "b": nn.Linear(8, 1)}
    s = heavy_heads(heads=big, backbone=backbone)
    assert s.status == "watch" and s.value == pytest.approx(641 / 72)  # heavy, rewriting not measured
    assert s.statistic == "head_ratio" and all(h["cka"] is None for h in s.details["heads"].values())

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.heads = backbone, nn.ModuleDict(big)

        def forward(self, x):
            h = self.backbone(x)
            return {t: m(h) for t, m in self.heads.items()}

    torch.manual_seed(0)
    model = Net()
    s = heavy_heads(model=model, probe=torch.randn(256, 8), thresholds=Thresholds(cka_split=0.99))
    assert s.status == "split"
    assert s.details["heads"]["b"]["cka"] == pytest.approx(1.0) and s.details["heads"]["a"]["cka"] < 0.99


def test_zero_sum_gradient_and_evaluation_levels(make_report, make_pair):
    # Opposed, unequal norms: the update follows the larger task and works against the smaller one.
    run = _run(make_report, [make_pair(-0.9, norms=(1.0, 3.0))] * 10)
    s = zero_sum(run)
    assert s.status == "split" and s.value == 1.0 and s.details["against_by_task"]["a"] == 1.0
    calm = _run(make_report, [make_pair(0.3)] * 10)
    assert zero_sum(calm).status == "ok"
    trading = [{"a": 0.80, "b": 0.70}, {"a": 0.82, "b": 0.69}, {"a": 0.80, "b": 0.71}]
    both_max = {"a": "max", "b": "max"}
    s = zero_sum(calm, evaluations=trading, directions=both_max)
    assert s.status == "split" and s.details["evaluation_trade_off_share"] == 1.0
    assert s.details["pareto_front"] == [1, 2]  # (0.80, 0.70) is dominated by (0.80, 0.71)
    improving = [{"a": 0.80, "b": 0.70}, {"a": 0.82, "b": 0.72}, {"a": 0.84, "b": 0.74}]
    assert zero_sum(calm, evaluations=improving, directions=both_max).status == "ok"
    # The same table with b an error (lower is better): every change is a trade-off.
    assert zero_sum(calm, evaluations=improving, directions={"a": "max", "b": "min"}).status == "split"
    with pytest.raises(ValueError, match="give the direction of each evaluation metric"):
        zero_sum(calm, evaluations=improving)


def test_single_point_of_risk(make_report, make_pair):
    helpful = _run(make_report, [make_pair(0.5)] * 4)
    s = single_point_of_risk(helpful)
    assert s.status == "ok" and s.value == pytest.approx(0.5) and s.details["negative_pairs"] == []
    hurt = _run(make_report, [make_pair(-0.05)] * 4)
    assert single_point_of_risk(hurt).status == "watch"
    hurt = _run(make_report, [make_pair(-0.5, norms=(1.0, 2.0))] * 8, losses=[1.0, 1.0])
    s = single_point_of_risk(hurt, lr=0.01)
    # N_ab = G_ab / G_bb = -0.5 * 2 / 4 = -0.25 and N_ba = -0.5 * 2 / 1 = -1: the small task suffers most.
    assert s.status == "split" and s.value == pytest.approx(-1.0)
    # The same four steps are fewer than the t-test's 5 effective steps: the value is the same, the evidence thin.
    few = single_point_of_risk(hurt[:4], lr=0.01)
    assert few.status == "watch" and few.value == pytest.approx(-1.0) and "watch, not split" in few.evidence
    assert s.details["negative_pairs"] == ["a->b", "b->a"] and s.details["method"] == "first order from G, lr=0.01"
    assert s.pairs == (("b", "a"),) and s.statistic == "normalized_affinity"  # a step on b hurts a most
    exact = single_point_of_risk(hurt, lookahead=(["a", "b"], [[0.1, 0.02], [0.01, 0.1]]))
    assert exact.status == "ok" and exact.details["method"] == "exact lookahead"


def test_single_point_of_risk_needs_a_mean_that_more_than_one_step_carries(make_report, make_pair):
    # 39 steps agree a little (cosine 0.1, unit norms); one early step (norms 10) fights hard (cosine -0.9). The mean
    # transference a->b is (-90 + 39 * 0.1) / 40 < 0, its normalised affinity -2.15 / 3.475 = -0.62, far below the
    # split cut-off; but one step carries it: scipy's one-sample t-test of the 40 values gives p = 0.16.
    values = np.array([-90.0] + [0.1] * 39)
    run = _run(make_report, [make_pair(-0.9, norms=(10.0, 10.0))] + [make_pair(0.1)] * 39)
    s = single_point_of_risk(run)
    assert s.value == pytest.approx(values.mean() / ((100 + 39) / 40))
    expected = stats.ttest_1samp(values, 0.0, alternative="less").pvalue
    assert s.status == "watch" and s.details["p_adjusted"]["a->b"] == pytest.approx(expected, rel=1e-6)
    assert expected > 0.05
    # A conflict that every step carries (cosine -0.3 +- 0.05) is significant on as many steps.
    rng = np.random.default_rng(0)
    steady = _run(make_report, [make_pair(float(c)) for c in -0.3 + 0.05 * rng.standard_normal(40)])
    s = single_point_of_risk(steady)
    assert s.status == "split" and max(s.details["p_adjusted"].values()) < 1e-10


def test_worst_status():
    assert worst_status() == "n/a"
    assert worst_status(*STATUSES) == "split"


def test_zero_sum_counts_each_task_on_the_steps_that_carry_it(make_cut, make_gram):
    # a and b on every step (cosine +0.5); c, small (norm 0.2) and against both (cosine -0.8), on 10 of 40 steps.
    # On c's steps (G w)_c = 0.2 * (-0.8) * 2 + 0.04 = -0.28 < 0: the update works against c every time it is
    # there, and never against a or b ((G w)_a = 1 + 0.5 - 0.16 > 0).
    G = make_gram([[1.0, 0.5, -0.8], [0.5, 1.0, -0.8], [-0.8, -0.8, 1.0]], norms=[1.0, 1.0, 0.2])
    run = [make_cut("bca" if s % 4 == 2 else "ab", G, step=s, tasks="abc") for s in range(40)]
    s = zero_sum(run)
    assert s.value == pytest.approx(10 / 40) and s.status == "watch"
    assert s.details["against_by_task"] == {"a": 0.0, "b": 0.0, "c": 1.0}  # c: 10 of its 10 steps, not 10 / 40
    assert s.statistic == "against_share" and s.details["steps_with_pairs"] == 40


def test_round_robin_signals_are_not_available(make_cut, make_gram):
    G = make_gram([[1.0, -0.9], [-0.9, 1.0]])
    run = [make_cut("ab"[s % 2], G, step=s, tasks="ab") for s in range(6)]
    for signal in (diverging_objectives(run), zero_sum(run), single_point_of_risk(run)):
        assert signal.status == "n/a" and signal.value is None and signal.pairs == () and signal.finding is None
        assert signal.evidence == no_pair_reason(align(run))  # what to measure, as the alignment says it
    # The evaluation level of signal 3 does not need gradients: it is still judged.
    trading = [{"a": 0.80, "b": 0.70}, {"a": 0.83, "b": 0.68}, {"a": 0.80, "b": 0.71}]
    s = zero_sum(run, evaluations=trading, directions={"a": "max", "b": "max"})
    assert s.status == "split" and s.value is None and s.details["evaluation_trade_off_share"] == 1.0
    assert s.evidence.startswith(f"gradient level not measured: {no_pair_reason(align(run))}")


def test_signals_do_not_depend_on_the_key_order(make_cut, make_gram):
    G = make_gram([[1.0, -0.4, 0.3], [-0.4, 1.0, 0.1], [0.3, 0.1, 1.0]], norms=[1.0, 2.0, 0.5])
    losses = [1.0, 3.0, 0.5]
    for one, other in [("abc", "cba"), ("abc", "bca")]:
        r1 = [make_cut(one, G, step=s, tasks="abc", losses=losses) for s in range(5)]
        r2 = [make_cut(other, G, step=s, tasks="abc", losses=losses) for s in range(5)]
        for f in (diverging_objectives, zero_sum, single_point_of_risk):
            assert f(r1).to_dict() == f(r2).to_dict()
    # Z_ab = G_ab / L_b = (-0.4 * 1 * 2) / 3, N_ab = Z_ab / Z_bb = -0.8 / 4 = -0.2; N_ba = -0.8 / 1 = -0.8.
    s = single_point_of_risk(r2)
    assert s.value == pytest.approx(-0.8) and s.details["tasks"] == ["a", "b", "c"]
    assert s.pairs == (("b", "a"),)  # a step on b alone raises a's loss: the directed pair (from, to)
    # An exact lookahead in another order is put in sorted order too.
    exact = single_point_of_risk(r2, lookahead=(["b", "a"], [[0.2, -0.1], [0.05, 0.1]]))
    assert exact.details["tasks"] == ["a", "b"] and exact.details["transference"] == [[0.1, 0.05], [-0.1, 0.2]]
    assert exact.value == pytest.approx(-0.1 / 0.1)  # N_ba = Z_ba / Z_aa
