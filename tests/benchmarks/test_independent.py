"""The independent diagnosis benchmark (benchmarks/diagnosis/independent): its statistics against hand-computed
references, and one tiny problem's truth and advice run end to end."""

import math

import pytest
from scipy import stats

pytest.importorskip("sklearn")
pytest.importorskip("torchjd")  # the truth trains the re-weighted shared models with its aggregators

from benchmarks.diagnosis.independent import truth as T  # noqa: E402
from benchmarks.diagnosis.independent.advice import advise_problem, block_of, from_dict, scored, to_dict  # noqa: E402
from benchmarks.diagnosis.independent.problems import KEEP, _c, conv, digit_problem, mlp, problems  # noqa: E402


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
    assert set(truth.judged) == {"independent", *T.CURES, "lora", *(f"branched@backbone.{k}" for k in range(4))}
    assert T.is_current(truth, tiny, 2) and not T.is_current(truth, tiny, 3)
    truth_without_cures = T.Truth.from_dict(truth.to_dict())
    del truth_without_cures.judged["aligned-mtl"]
    assert not T.is_current(truth_without_cures, tiny, 2)  # measured before the weightings: stale
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


def _cure_judged(**cures: float) -> dict[str, T.Judgement]:
    """Independent models win by +10 (nothing else splits); each named cure beats shared by its gain."""
    lose = T.Judgement([0.0, 0.0], 0.0, 0.5, False)
    return {
        "independent": T.Judgement([10.0, 10.0], 10.0, 0.001, True), "lora": lose,
        **{c: T.Judgement([g, g], g, 0.001, True) for c, g in cures.items()},
        **{f"branched@backbone.{k}": lose for k in range(4)},
    }


def test_keep_shared_with_a_weighting_counts_only_when_the_balanced_model_recovers_the_gain():
    from benchmarks.diagnosis.independent.advice import Reading, score

    assert "keep_shared+balanced" in T.decide(_cure_judged(balanced=8.0), ["a", "b"])[1]  # 80% of +10 recovered
    verdict, verdicts, blocks, _ = T.decide(_cure_judged(balanced=7.9), ["a", "b"])
    assert verdicts == ["physical_split"] and blocks == ["backbone.0"]
    truth = T.Truth("t", "", 2, {}, _cure_judged(balanced=8.0), verdict, ["physical_split", "keep_shared+balanced"],
                    blocks, "backbone.0", [["a"], ["b"]], [[["a"], ["b"]]])
    weighted = Reading("keep_shared", None, None, [["a", "b"]], True, "", "aligned-mtl")
    plain = Reading("keep_shared", None, None, [["a", "b"]], True, "", None)
    assert score(truth, weighted)["verdict"] is True and score(truth, plain)["verdict"] is False


def test_keep_shared_counts_when_the_weighting_the_advice_names_recovers_the_gain():
    from benchmarks.diagnosis.independent.advice import Reading, score

    # aligned-mtl recovers 98% of the independent models' +10, imtl-g 50%, the loss normalisation 71%
    judged = _cure_judged(balanced=7.1, **{"imtl-g": 5.0, "aligned-mtl": 9.8})
    verdict, verdicts, blocks, economical = T.decide(judged, ["a", "b"])
    assert verdict == "physical_split" and verdicts == ["physical_split", "keep_shared+aligned-mtl"]
    truth = T.Truth("t", "", 2, {}, judged, verdict, verdicts, blocks, economical, [["a"], ["b"]], [[["a"], ["b"]]])

    def reading(weighting: str | None, verdict: str = "keep_shared", block: str | None = None) -> Reading:
        groups = [["a"], ["b"]] if verdict == "physical_split" else [["a", "b"]]
        return Reading(verdict, block, block, groups, True, "", weighting)

    named = score(truth, reading("aligned-mtl"))
    assert named["verdict"] and named["groups"] and named["acceptable_block"] is None  # no branch point to score
    for other in ("imtl-g", "upgrad", None):  # a weighting the truth shows short of 80%, or none it trains
        missed = score(truth, reading(other))
        assert not missed["verdict"] and not missed["groups"] and missed["acceptable_block"] is False
    split = score(truth, reading(None, "physical_split", "backbone.0"))
    assert split["verdict"] and split["groups"] and split["acceptable_block"]
    # the loss normalisation stands in for any named weighting once it recovers 80% itself
    judged = _cure_judged(balanced=8.5, **{"imtl-g": 5.0, "aligned-mtl": 2.0})
    verdicts = T.decide(judged, ["a", "b"])[1]
    assert verdicts == ["physical_split", "keep_shared+balanced"]
    truth = T.Truth("t", "", 2, {}, judged, verdict, verdicts, blocks, economical, [["a"], ["b"]], [[["a"], ["b"]]])
    assert score(truth, reading("imtl-g"))["verdict"] and not score(truth, reading(None))["verdict"]


@pytest.mark.parametrize("weighting", sorted(T.WEIGHTINGS))
def test_a_weighted_step_combines_the_task_gradients_as_the_method_defines(weighting):
    import numpy as np
    import torch

    problem = digit_problem(
        "scaled", "oracle", (KEEP, None, [["class", "loop"]]),
        [(_c("class", 10, scale=30.0), "class", 0), (_c("loop", 2), "loop", 0)], "mlp",
        lambda: mlp(64, (16, 16, 8, 8)), 8, steps=1,
    )
    run, tasks = T._Trainer(problem, 0), problem.names
    idx, model = run.batches[0], problem.model(0)
    shared = list(model.backbone.parameters())
    out = model(problem.x[idx])
    losses = {t: run.loss_fns[t](out[t], problem.y[t][idx]) for t in tasks}
    rows = [torch.autograd.grad(losses[t], shared, retain_graph=True) for t in tasks]
    J = np.stack([np.concatenate([g.double().flatten().numpy() for g in row]) for row in rows])  # float64
    heads = {t: torch.autograd.grad(losses[t], list(model.heads[t].parameters()), retain_graph=True) for t in tasks}
    model.zero_grad()
    run.jacobian_backward(model, tasks, idx, T.WEIGHTINGS[weighting]())
    got = np.concatenate([q.grad.double().flatten().numpy() for q in shared])
    norms = np.linalg.norm(J, axis=1)
    assert norms.max() > 5 * norms.min()  # a dominated pair: a plain sum would not pass the checks below
    if weighting == "imtl-g":  # Liu et al. (2021): equal projections on every task's unit gradient, weights sum to 1
        alpha = np.linalg.lstsq(J.T, got, rcond=None)[0]
        assert np.allclose(J.T @ alpha, got, rtol=1e-5, atol=1e-9) and alpha.sum() == pytest.approx(1.0, abs=1e-5)
        projections = (J / norms[:, None]) @ got
        assert projections[0] == pytest.approx(projections[1], rel=1e-4)
    else:  # Senushkin et al. (2023): the mean of the rows of sigma_min U V^T, from J = U S V^T
        U, S, Vt = np.linalg.svd(J, full_matrices=False)
        assert np.allclose(got, S.min() * (U @ Vt).mean(0), rtol=1e-4, atol=1e-8)
    for t in tasks:  # each head: the gradient of its own loss
        for q, g in zip(model.heads[t].parameters(), heads[t]):
            assert torch.allclose(q.grad, g)


def test_hit_rates_by_seed_pool_every_seeds_problems():
    from types import SimpleNamespace

    from benchmarks.diagnosis.independent.advice import AdviceOutcome, Reading
    from benchmarks.diagnosis.independent.report import by_seed

    def outcome(name, hit):
        reading = Reading("keep_shared", None, None, [["a", "b"]], True, "decided")
        scored = AdviceOutcome(name, reading, reading, None, 0.0)
        scored.scores = {k: hit for k in ("first_verdict", "after_verdict", "first_groups", "after_groups")}
        scored.scores |= {k: None for k in ("first_economical", "first_acceptable_block", "after_acceptable_block")}
        return scored

    problems = {n: SimpleNamespace(tasks=["a", "b"]) for n in ("p", "q")}
    lines = by_seed({3: [outcome("p", True), outcome("q", True)], 0: [outcome("p", True), outcome("q", False)]},
                    problems)
    assert lines[0] == "| measure | seed 0 | seed 3 | pooled | target |"
    row = next(line for line in lines if line.startswith("| verdict after next_step |"))
    assert row.split(" | ")[1:4] == ["1 / 2 (50%)", "2 / 2 (100%)", "3 / 4 (75%)"]
    unscored = next(line for line in lines if line.startswith("| branch point within the acceptable blocks, first"))
    assert unscored.split(" | ")[1:4] == ["-", "-", "-"]
