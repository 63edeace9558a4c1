from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import scipy.stats
import torch
from torch import nn

from gradconflict.records.comparison import IdenticalSeedsWarning
from gradconflict.split import ComparisonResult, MultiTaskNet, VariantRecord, compare, split_gains
from gradconflict.split.costs import interleaved_ms

from .helpers import MSE, batches, mlp_net


def _run(seed: int = 0, factory=mlp_net, **kwargs):
    options = dict(steps=12, branch_at=2, groups=[["a"], ["b"]], seed=seed, progress=False, evals=3)
    options.update(kwargs)
    return compare(factory, MSE, batches(5), **options)


def test_compare_runs_every_variant_and_tabulates_them():
    res = _run()
    assert list(res.variants) == ["shared", "independent", "lora", "branched"]
    assert [(r["variant"], r["task"]) for r in res.rows][:3] == [("shared", "a"), ("shared", "b"), ("independent", "a")]
    assert res.split_step == 6 and res["lora"].start == 6 and res["shared"].start == 0
    assert res.branch_at == 2 and res.groups == [["a"], ["b"]]
    for rec in res.variants.values():
        assert all(len(v) == 12 for v in rec.losses.values())
        assert [s for s, _ in rec.evals] == [4, 8, 12]
        assert rec.params > 0 and rec.step_ms > 0 and rec.latency_ms > 0 and rec.memory_mb > 0
    # lora and branched continue the shared run: identical until the split
    for name in ("lora", "branched"):
        assert res.history[name]["a"][:6] == res.history["shared"]["a"][:6]
        assert res[name].evals[0] == res["shared"].evals[0]
    assert res["branched"].params > res["shared"].params
    # shared trains in two phases around the split step; its memory is measured once, as without a split
    assert _run(variants=("shared",), split_fraction=0.0)["shared"].memory_mb == res["shared"].memory_mb
    row = next(r for r in res.rows if r["variant"] == "independent")
    assert row["delta_m"] == 0.0 and res.delta_m["independent"] == 0.0
    json.dumps(res.to_dict(), allow_nan=False)  # strict JSON
    table = res.to_markdown()
    assert table.count("\n| ") == 1 + 8  # the separator, then one row per variant and task
    assert "Δm% vs independent" in table and "ceiling broken" in table


def test_compare_is_reproducible_for_a_fixed_seed():
    first, second = _run(seed=3), _run(seed=3)
    for name in first.variants:
        assert first.history[name] == second.history[name]
        assert first[name].evals == second[name].evals
    assert first.delta_m == second.delta_m and first.ceiling_broken == second.ceiling_broken
    assert _run(seed=4).history["shared"] != first.history["shared"]


def test_several_branch_points_in_one_call_match_one_call_per_point():
    # The oracle: separate compare() calls, one per branch point, with the same seed. One call at both points
    # trains every other variant once and each branched copy from the same checkpoint: bit-identical records.
    for seed in (0, 1):
        both = _run(seed, branch_at=[0, 2], weightings=["mgda"])
        assert list(both.variants) == ["shared", "shared+mgda", "independent", "lora", "branched@0", "branched@2"]
        assert both.branch_at == [0, 2] and both.groups == [["a"], ["b"]]
        for point in (0, 2):
            alone = _run(seed, branch_at=point, weightings=["mgda"])
            assert alone.branch_at == point and list(alone.variants)[-1] == "branched"
            for name, rec in alone.variants.items():
                mine = both[f"branched@{point}" if name == "branched" else name]
                assert mine.losses == rec.losses and mine.evals == rec.evals, (seed, point, name)
                assert (mine.params, mine.start, mine.memory_mb) == (rec.params, rec.start, rec.memory_mb)
                assert mine.step_ms > 0 and mine.latency_ms > 0  # every variant's costs timed
        # the two points give two different models (copies of the whole backbone against of its last layer)
        assert both["branched@0"].params > both["branched@2"].params
        assert both.history["branched@0"] != both.history["branched@2"]
    record = json.loads(json.dumps(both.to_dict(), allow_nan=False))
    assert record["branch_at"] == [0, 2] and list(record["variants"])[-2:] == ["branched@0", "branched@2"]
    assert both.to_markdown().count("\n| branched@") == 4  # a row per branched copy and task
    # a tuple of one point is a list of points too: its variant is named by its point
    one = _run(1, branch_at=(2,), variants=("shared", "branched"))
    assert list(one.variants) == ["shared", "branched@2"] and one.branch_at == [2]
    assert one["branched@2"].losses == alone["branched"].losses


def test_data_order_is_replayed_and_cycled():
    seen = []

    class Loader:
        """A re-iterable that reshuffles on every pass, like a shuffling DataLoader."""

        def __iter__(self):
            order = torch.randperm(3).tolist()
            seen.append(order)
            data = batches(3)
            return iter([data[i] for i in order])

    res = compare(mlp_net, MSE, Loader(), steps=7, variants=("shared", "independent"), progress=False,
                  eval_data=batches(1, seed=9))
    assert len(seen) == 3  # 7 steps from a 3-batch loader: passes of 3 + 3 + 1, recorded once, then replayed
    data = batches(3)
    replay = [data[i] for order in seen for i in order][:7]
    same = compare(mlp_net, MSE, replay, steps=7, variants=("shared", "independent"), progress=False,
                   eval_data=batches(1, seed=9))
    assert same.history == res.history  # every variant saw exactly the recorded order


def test_branched_without_a_point_is_skipped_with_a_note_and_a_model_can_be_passed():
    torch.manual_seed(0)
    model = mlp_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compare(model, MSE, batches(2), steps=4, variants=("shared", "branched"), progress=False)
    assert list(res.variants) == ["shared"] and "branched skipped" in res.notes[1]
    assert "does not reach the model's initialisation" in res.notes[0]  # a model passed as is: every seed starts there
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the given model is copied
    assert res.delta_m == {} and "Note: branched skipped" in res.to_markdown()


def test_custom_metrics_several_per_task_and_directions():
    def accuracy_like(out, target):
        return float(-(out - target).abs().mean())

    def mse(out, target):
        return float((out - target).pow(2).mean())

    metrics = {"a": {"closeness": (accuracy_like, "max"), "mse": (mse, "min")}, "b": (mse, "min")}
    res = _run(variants=("shared", "independent"), metrics=metrics)
    rec = res["shared"]
    assert rec.directions == {"a": {"closeness": "max", "mse": "min"}, "b": {"b": "min"}}
    assert [(r["task"], r["metric"]) for r in res.rows[:3]] == [("a", "closeness"), ("a", "mse"), ("b", "b")]
    step, final = rec.final()
    assert step == 12 and set(final["a"]) == {"closeness", "mse"}
    # Delta-m% vs independent, by hand from the two final checkpoints, averaged per metric.
    base = res["independent"].final()[1]
    terms = [
        (final["a"]["closeness"] - base["a"]["closeness"]) / abs(base["a"]["closeness"]),
        -(final["a"]["mse"] - base["a"]["mse"]) / base["a"]["mse"],
        -(final["b"]["b"] - base["b"]["b"]) / base["b"]["b"],
    ]
    assert res.delta_m["shared"] == pytest.approx(100 * sum(terms) / 3)
    assert dataclasses.replace(res, average="task").delta_m["shared"] == pytest.approx(
        100 * ((terms[0] + terms[1]) / 2 + terms[2]) / 2
    )
    with pytest.raises(ValueError, match="'max' \\(higher is better\\) or 'min'"):
        _run(variants=("shared",), metrics={"a": (mse, "lower"), "b": (mse, "min")})
    with pytest.raises(ValueError, match="no metric for tasks \\['b'\\]"):
        _run(variants=("shared",), metrics={"a": (mse, "min")})


def test_delta_m_reads_one_checkpoint_per_variant():
    # Each task peaks at a different evaluation, but no checkpoint has both peaks: the best checkpoint by Delta-m%
    # is a real model, not each task's best at its own step (which would report +12.5% here).
    def rec(name, evals):
        return VariantRecord(name, {"a": [1.0], "b": [1.0]}, evals, {"a": "min", "b": "min"})

    single = rec("independent", [(1, {"a": 1.0, "b": 1.0}), (2, {"a": 1.0, "b": 1.0})])
    shared = rec("shared", [(1, {"a": 0.75, "b": 1.5}), (2, {"a": 1.5, "b": 0.75})])
    res = ComparisonResult({"shared": shared, "independent": single}, ["a", "b"], steps=2, split_step=0)
    assert res.delta_m["shared"] == pytest.approx((-50.0 + 25.0) / 2)  # the final checkpoint
    best = dataclasses.replace(res, select="best")
    assert best.checkpoints["shared"][0] == 1 and best.delta_m["shared"] == pytest.approx(-12.5)
    per_task_best = (25.0 + 25.0) / 2  # what picking each task's best at its own step would claim
    assert best.delta_m["shared"] < 0 < per_task_best
    assert {r["step"] for r in best.rows if r["variant"] == "shared"} == {1}


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="variants"):
        _run(variants=("shared", "bogus"))
    with pytest.raises(ValueError, match="split_fraction"):
        _run(split_fraction=1.0)
    with pytest.raises(ValueError, match="non-empty list"):
        _run(branch_at=[])
    with pytest.raises(ValueError, match=r"names a branch point twice: \[2, 0, 2\]"):
        _run(branch_at=[2, 0, 2])
    with pytest.raises(ValueError, match=r"\(x, \{task: target\}\)"):
        compare(mlp_net, MSE, [torch.zeros(2, 4)], steps=2, progress=False)
    with pytest.raises(ValueError, match="no head for tasks"):
        compare(mlp_net, {"c": MSE["a"]}, batches(1), steps=2, progress=False)
    with pytest.raises(ValueError, match="yielded no batch"):
        compare(mlp_net, MSE, [], steps=2, progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        compare(mlp_net, MSE, iter(batches(1)), steps=2, progress=False)


def test_ceiling_broken_and_delta_m_from_records():
    def rec(name, a, b):
        return VariantRecord(name, {"a": [1.0] * 3, "b": [1.0] * 3}, [(3, {"a": a, "b": b})], {"a": "min", "b": "max"})

    res = ComparisonResult(
        {"shared": rec("shared", 1.0, 0.5), "independent": rec("independent", 0.8, 0.5), "lora": rec("lora", 1.1, 0.6)},
        ["a", "b"], steps=3, split_step=0,
    )
    assert res.ceiling_broken == {"independent": ["a"], "lora": ["b"]}
    assert res.any_ceiling_broken
    assert res.delta_m["shared"] == pytest.approx((-25.0 + 0.0) / 2)
    assert res.delta_m["lora"] == pytest.approx((-37.5 + 20.0) / 2)
    frame = res.to_dataframe()
    assert frame.loc[("lora", "b", "b"), "beats_shared"] and frame.loc[("shared", "a", "a"), "beats_shared"] is None
    assert "Δm% vs independent (positive: better; final checkpoint; averaged per metric)" in res.to_markdown()


def _seeds(shared: list[float], gains: dict[str, list[float]]) -> list[ComparisonResult]:
    """One result per seed with one "min" metric: the shared model's value, and each variant's value planted so
    that its Delta-m% against the same seed's shared model is the given gain."""

    def rec(name, value, seed):
        return VariantRecord(name, {"a": [value + seed]}, [(1, {"a": value})], {"a": "min"})

    return [
        ComparisonResult(
            {"shared": rec("shared", s, k), **{n: rec(n, s * (1 - g[k] / 100), k) for n, g in gains.items()}},
            ["a"], steps=1, split_step=0, seed=k,
        )
        for k, s in enumerate(shared)
    ]


def test_split_gains_are_judged_by_a_paired_test_with_a_floor():
    # The shared model moves a lot from seed to seed (its own Delta-m% spreads by about 30%), while each split's
    # gain over the same seed's shared model is planted.
    planted = {
        "consistent": [25.5, 26.0, 29.4],  # the same +27% on every seed, far inside the shared model's own spread
        "varied": [60.7, 35.3, 18.4],  # ahead on every seed, p = 0.047: not yet at 2.5% (5 seeds would tell)
        "tiny": [0.0004, 0.0003, 0.0005],  # ahead on every seed, in the fourth digit
        "mixed": [40.0, -5.0, -3.0],  # one lucky seed: three seeds cannot tell
        "wide": [6.0, -4.0, 2.0],  # +0.3% above the floor at a spread of 5%: no gain worth a split
    }
    gains = split_gains(_seeds([1.0, 1.3, 0.7], planted))
    assert gains["consistent"].spread == pytest.approx(30.0)
    for name, values in planted.items():
        assert gains[name].per_seed == pytest.approx(values)
    assert gains["consistent"].beyond is True and gains["varied"].beyond is None and gains["varied"].seeds_needed == 5
    assert gains["tiny"].beyond is False and gains["wide"].beyond is False and gains["mixed"].beyond is None
    # the p-value is the one-sided paired t-test's, against the 1% floor: by hand
    d = planted["varied"]
    t = (statistics.fmean(d) - 1.0) / (statistics.stdev(d) / math.sqrt(len(d)))
    assert gains["varied"].p_value == pytest.approx(scipy.stats.t.sf(t, len(d) - 1))
    assert gains["varied"].floor == 1.0 and gains["varied"].seeds_vary
    one = split_gains(_seeds([1.0], {"consistent": [27.0], "tiny": [0.0004]}))
    assert one["consistent"].beyond is None and one["tiny"].beyond is False  # one seed cannot confirm a gain
    with pytest.raises(ValueError, match="no 'shared' variant"):
        split_gains([ComparisonResult({"big": _seeds([1.0], {})[0]["shared"]}, ["a"], steps=1, split_step=0)])


def test_seeds_that_change_nothing_are_flagged():
    # the same shared run on every "seed": whatever the gains, nothing was learnt about seed-to-seed variation
    runs = _seeds([1.0, 1.0, 1.0], {"split": [30.0, 31.0, 29.0]})
    for r in runs:
        r.variants["shared"] = runs[0]["shared"]
        r.seed = None
    with pytest.warns(IdenticalSeedsWarning):
        gain = split_gains(runs)["split"]
    assert gain.seeds_vary is False and gain.beyond is None

    # as met in practice: a factory that seeds itself, and fixed batches
    def self_seeding():
        torch.manual_seed(0)
        return mlp_net()

    results = [_run(seed=s, factory=self_seeding, variants=("shared", "branched")) for s in range(3)]
    assert all(r.history == results[0].history for r in results)  # bit-identical runs
    assert all("does not reach" in r.notes[0] for r in results)
    with pytest.warns(IdenticalSeedsWarning):
        gains = split_gains(results)
    assert gains["branched"].beyond in (None, False) and not gains["branched"].seeds_vary
    with pytest.warns(IdenticalSeedsWarning):  # one seed given twice
        assert split_gains([_run(seed=1, variants=("shared", "branched"))] * 2)["branched"].seeds_vary is False


def test_compare_on_a_small_cnn_with_batchnorm():
    def cnn():
        backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten()
        )
        return MultiTaskNet(backbone, {"a": nn.Linear(4 * 3 * 3, 1), "b": nn.Linear(4 * 3 * 3, 1)})

    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 8, 1, 7, 7, generator=g)
    data = [(x, {"a": x.mean((1, 2, 3))[:, None], "b": x.amax((1, 2, 3))[:, None]}) for x in images]
    res = compare(cnn, MSE, data, steps=6, branch_at=3, progress=True, evals=2)  # with tqdm's bars
    assert list(res.variants) == ["shared", "independent", "lora", "branched"]
    assert res["lora"].params > res["shared"].params  # adapters on both convolutions
    assert repr(res).startswith("ComparisonResult(variants=['shared'") and str(res) == res.to_markdown()
    assert repr(res["lora"]) == f"VariantRecord('lora', tasks=['a', 'b'], steps=6, params={res['lora'].params})"


def test_costs_are_timed_round_robin_on_one_thread():
    calls, threads = [], []

    def call(name):
        def run():
            calls.append(name)
            threads.append(torch.get_num_threads())
        return run

    before = torch.get_num_threads()
    timings = interleaved_ms({"a": call("a"), "b": call("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # a warm-up round, then three timed rounds, the variants in turn
    assert set(threads) == {1} and torch.get_num_threads() == before  # the thread count is restored
    assert set(timings) == {"a", "b"} and all(t.wall >= 0 and t.cpu >= 0 for t in timings.values())
