"""The independent diagnosis benchmark (benchmarks/diagnosis/independent): its statistics against hand-computed
references, and one tiny problem's truth and advice run end to end."""

import math

import pytest
from scipy import stats

pytest.importorskip("sklearn")

from benchmarks.diagnosis.independent import truth as T  # noqa: E402
from benchmarks.diagnosis.independent.advice import advise_problem, block_of, from_dict, scored, to_dict  # noqa: E402
from benchmarks.diagnosis.independent.problems import KEEP, _c, conv, digit_problem, problems  # noqa: E402


def test_gain_is_the_mean_signed_relative_improvement():
    # accuracy 0.9 -> 0.99 is +10%; mean squared error 2.0 -> 1.0 is +50%
    got = T.gain({"acc": 0.99, "mse": 1.0}, {"acc": 0.9, "mse": 2.0}, {"acc": "max", "mse": "min"})
    assert got == pytest.approx(30.0)


def test_judge_is_a_one_sided_paired_t_test_with_a_floor():
    per_seed = [2.0, 3.5, 1.5, 2.5]
    j = T.judge(per_seed)
    ref = stats.ttest_1samp(per_seed, 0.0, alternative="greater").pvalue
    assert j.p_value == pytest.approx(ref) and j.mean == pytest.approx(2.375) and j.wins
    assert not T.judge([0.5, 0.6, 0.55, 0.52]).wins  # significant, but below the floor
    assert not T.judge([5.0, -4.0, 6.0, -3.0]).wins  # above the floor, not significant


def test_set_partitions_are_the_bell_numbers_and_distinct():
    for n, bell in [(2, 2), (3, 5), (4, 15)]:
        parts = [T.canonical(p) for p in T.set_partitions([str(i) for i in range(n)])]
        assert len(parts) == bell and len({str(p) for p in parts}) == bell


def _j(mean, wins):
    return T.Judgement([mean] * 4, mean, 0.0 if wins else 1.0, wins)


def test_decide_picks_the_highest_block_that_recovers_most_of_the_best_gain():
    judged = {"independent": _j(9.0, True), "lora": _j(3.0, True), "branched@backbone.0": _j(10.0, True),
              "branched@backbone.1": _j(9.0, True), "branched@backbone.2": _j(7.0, True),
              "branched@backbone.3": _j(0.5, False)}
    verdict, verdicts, blocks, economical = T.decide(judged, ["a", "b"])
    assert (verdict, verdicts) == ("physical_split", ["physical_split"])  # lora's 3 is below 80% of 10
    assert blocks == ["backbone.0", "backbone.1"] and economical == "backbone.1"  # 7 < 0.8 * 10
    none = {k: _j(0.2, False) for k in judged}
    assert T.decide(none, ["a", "b"])[:2] == ("keep_shared", ["keep_shared"])
    only_lora = {**none, "lora": _j(5.0, True), "branched@backbone.2": _j(4.5, True)}
    # lora wins; the branch at block 2 recovers 90% of its gain: both verdicts are accepted, lora first
    assert T.decide(only_lora, ["a", "b"])[:3] == ("lora_split", ["lora_split", "physical_split"], ["backbone.2"])


def test_block_of_maps_layer_names_to_blocks():
    assert block_of("backbone.2.1.weight") == "backbone.2" and block_of(None) is None


def test_every_problem_has_four_blocks_and_a_stable_fingerprint():
    every = problems()
    assert len(every) >= 12 and len({p.name for p in every}) == len(every)
    p = every[0]
    assert p.fingerprint() == p.fingerprint() and len(p.model(0).backbone) == 4
    assert p.batch_indices(1)[0].tolist() == p.batch_indices(1)[0].tolist()
    assert p.batch_indices(1)[0].tolist() != p.batch_indices(2)[0].tolist()


def _tiny():
    return digit_problem(
        "tiny", "smoke test", (KEEP, None, [["class", "loop"]]),
        [(_c("class", 10), "class", 0), (_c("loop", 2), "loop", 0)], "conv", lambda: conv((2, 2), 4, 4), 4, steps=12,
    )


def test_a_tiny_problem_runs_through_truth_and_the_first_look():
    tiny = _tiny()
    truth = T.measure(tiny, 2, log=lambda _: None)
    assert set(truth.judged) == {"independent", "balanced", "lora", *(f"branched@backbone.{k}" for k in range(4))}
    assert truth.verdict in truth.verdicts and all(len(v) == 2 for v in truth.metrics.values())
    assert all(math.isfinite(j.mean) for j in truth.judged.values())
    again = T.Truth.from_dict(truth.to_dict())
    assert again.judged == truth.judged and again.groups == truth.groups
    outcome = scored(advise_problem(tiny, next_step=False), truth)
    assert outcome.after is None and outcome.scores["first_verdict"] in (True, False)
    assert from_dict(to_dict(outcome)).first == outcome.first


@pytest.mark.slow
def test_a_tiny_problem_runs_its_next_step():
    tiny = _tiny()
    truth = T.measure(tiny, 2, log=lambda _: None)
    outcome = scored(advise_problem(tiny, next_step=True), truth)
    assert outcome.error is None, outcome.error
    assert outcome.after is not None and outcome.scores["after_verdict"] in (True, False)


def test_keep_shared_with_a_weighting_counts_only_when_the_balanced_model_recovers_the_gain():
    from benchmarks.diagnosis.independent.advice import Reading, score

    def judged(balanced: float) -> dict[str, T.Judgement]:
        win = T.Judgement([10.0, 10.0], 10.0, 0.001, True)
        return {
            "independent": win, "lora": T.Judgement([0.0, 0.0], 0.0, 0.5, False),
            "balanced": T.Judgement([balanced] * 2, balanced, 0.001, True),
            **{f"branched@backbone.{k}": T.Judgement([0.0, 0.0], 0.0, 0.5, False) for k in range(4)},
        }

    assert "keep_shared+reweight" in T.decide(judged(8.0), ["a", "b"])[1]  # 80% of +10 recovered
    verdict, verdicts, blocks, _ = T.decide(judged(7.9), ["a", "b"])
    assert verdicts == ["physical_split"] and blocks == ["backbone.0"]
    truth = T.Truth("t", "", 2, {}, judged(8.0), verdict, ["physical_split", "keep_shared+reweight"], blocks,
                    "backbone.0", [["a"], ["b"]], [[["a"], ["b"]]])
    weighted = Reading("keep_shared", None, None, [["a", "b"]], True, "", "aligned-mtl")
    plain = Reading("keep_shared", None, None, [["a", "b"]], True, "", None)
    assert score(truth, weighted)["verdict"] is True and score(truth, plain)["verdict"] is False
