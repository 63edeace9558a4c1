"""The examples that carry a pair's conflict: the ids, the share they carry and the what-if, against answers known
from the construction (a tally filled by hand, sums worked out by hand or from the raw per-step arrays), and the
advice that names them when a split would not cure the conflict, on a monitored run with a planted sub-population.
"""

from __future__ import annotations

import html
import json

import numpy as np
import pytest
import torch
from scipy import stats

from gradconflict import History
from gradconflict.diagnosis import advise, advise_from_jsonl, align
from gradconflict.diagnosis.examples import (
    MAX_SHARE,
    carried_curve,
    conflicting_examples,
    pairs_with_examples,
)
from gradconflict.records.samples import SampleTally
from gradconflict.split import ComparisonResult, VariantRecord
from tests.runs import planted_run

STEPS = 10


def planted_tally() -> SampleTally:
    """Ids 0..99 on each of 10 steps: ids 0..4 push the pair apart by 10 on every step (agreement -1); ids 50..99
    by 0.2 (agreement 0.2); ids 5..49 pull it together by 0.5 (agreement 0.5)."""
    push = np.array([-10.0] * 5 + [0.5] * 45 + [-0.2] * 50)
    agreement = np.array([-1.0] * 5 + [0.5] * 45 + [0.2] * 50)
    tally = SampleTally()
    for _ in range(STEPS):
        tally.add_pair(("a", "b"), list(range(100)), torch.tensor(push), torch.tensor(agreement))
    return tally


def test_the_planted_ids_their_share_and_the_what_if_by_hand():
    found = conflicting_examples(planted_tally(), "b", "a")
    # Summed over the 10 steps: each planted id -100, each of 50..99 -2, each of 5..49 +5.
    negative = 5 * -100 + 50 * -2  # -600
    total = (5 * -100 + 50 * -2 + 45 * 5) / 2  # the summed Gram entry: half the summed pushes, -187.5
    carried = 5 * -100 / 2  # -250
    assert found.pair == ("a", "b") and found.attributed == 100 and found.ranked_by == "agreement"
    assert sorted(found.ids) == [0, 1, 2, 3, 4]  # past them, each id carries 2/600 of the push: less than 1/100
    assert found.id_share == 0.05
    assert found.negative == pytest.approx(negative) and found.push_share == pytest.approx(500 / 600)
    assert found.total == pytest.approx(total) and found.carried == pytest.approx(carried)
    assert found.without == pytest.approx(total - carried) == pytest.approx(62.5)
    assert found.halved == pytest.approx(total - carried / 2) == pytest.approx(-62.5)
    assert found.removing_cures and not found.halving_cures
    for e in found.examples:
        assert (e.steps, e.push, e.apart, e.agreement) == (STEPS, -10.0, 1.0, -1.0)
        assert e.share == pytest.approx(100 / 600)
    text = found.sentence()
    assert text.startswith("5.0% of the examples (5 of 100 ids") and "carry 83% of the negative inner product" in text
    assert "from -188 to +62.5" in text and "leaves it at -62.5" in text and "first order" in text
    data = json.loads(json.dumps(found.to_dict()))
    assert data["pair"] == "a/b" and data["without"] == pytest.approx(62.5) and len(data["examples"]) == 5


def test_the_concentration_curve_and_the_cap():
    tally = planted_tally()
    curve = carried_curve(tally, "a", "b")
    # Ranked: ids 0..4 (agreement -1), then 50..99 (0.2), then 5..49 (0.5).
    expected = np.cumsum([100.0] * 5 + [2.0] * 50 + [0.0] * 45) / 600
    assert curve == pytest.approx(expected)
    # Twenty ids planted alike among 100: the rule would take all twenty, the cap stops it at a tenth.
    alike = SampleTally()
    alike.add_pair(("a", "b"), list(range(100)), torch.tensor([-1.0] * 20 + [0.1] * 80),
                   torch.tensor([-1.0] * 20 + [0.5] * 80))
    capped = conflicting_examples(alike, "a", "b")
    assert len(capped.ids) == int(MAX_SHARE * 100) and set(capped.ids) <= set(range(20))
    assert capped.push_share == pytest.approx(10 / 20)


def test_a_conflict_spread_over_the_data_names_no_one():
    # The ten ids the tasks disagree on most pull the pair together; the ninety others each push it apart a little.
    tally = SampleTally()
    tally.add_pair(("a", "b"), list(range(100)), torch.tensor([1.0] * 10 + [-1.0] * 90),
                   torch.tensor([-1.0] * 10 + [0.0] * 90))
    found = conflicting_examples(tally, "a", "b")
    assert found.ids == () and found.push_share == 0.0 and found.total == pytest.approx((10 - 90) / 2)
    assert "no small set of examples carries the conflict" in found.sentence()
    calm = SampleTally()
    calm.add_pair(("a", "b"), [0, 1], torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.2]))
    agreeing = conflicting_examples(calm, "a", "b")
    assert agreeing.ids == () and agreeing.push_share is None and "no example pushes" in agreeing.sentence()


def test_random_batches_against_the_raw_per_step_arrays():
    """Ids drawn with repeats into batches of varying size: every sum recomputed from the raw arrays added."""
    rng = np.random.default_rng(3)
    tally = SampleTally()
    raw: dict[int, list[tuple[float, float]]] = {}
    for _ in range(30):
        ids = rng.integers(0, 60, size=int(rng.integers(5, 20))).tolist()
        push, agreement = rng.normal(size=len(ids)) - 0.2, rng.normal(size=len(ids))
        tally.add_pair(("x", "y"), ids, torch.tensor(push), torch.tensor(agreement))
        for i, p, g in zip(ids, push, agreement):
            raw.setdefault(i, []).append((float(p), float(g)))
    summed = {i: sum(p for p, _ in rows) for i, rows in raw.items()}
    ranked = sorted(raw, key=lambda i: np.mean([g for _, g in raw[i]]))
    k = 7
    found = conflicting_examples(tally, "x", "y", k=k)
    assert list(found.ids) == ranked[:k]
    negative = sum(min(v, 0.0) for v in summed.values())
    assert found.push_share == pytest.approx(sum(min(summed[i], 0.0) for i in ranked[:k]) / negative)
    assert found.total == pytest.approx(sum(summed.values()) / 2)
    assert found.without == pytest.approx(sum(v for i, v in summed.items() if i not in ranked[:k]) / 2)
    assert found.halved == pytest.approx((sum(summed.values()) - sum(summed[i] for i in ranked[:k]) / 2) / 2)
    assert [e.steps for e in found.examples] == [len(raw[i]) for i in ranked[:k]]
    by_push = conflicting_examples(tally, "x", "y", k=3, by="push")
    assert list(by_push.ids) == sorted(raw, key=lambda i: summed[i] / len(raw[i]))[:3]


def coin_run(make_report, make_pair, steps=200):
    """Reports of tasks a and b whose cosine is +-0.4 at random, half of each: a conflict at chance."""
    rng = np.random.default_rng(0)
    return [make_report(make_pair(float(c)), step=s) for s, c in enumerate(rng.permutation([-0.4, 0.4] * (steps // 2)))]


def test_the_advice_names_the_examples_of_an_oscillating_conflict(make_report, make_pair):
    run = coin_run(make_report, make_pair)
    tally = planted_tally()
    advice = advise(run, samples=tally)
    assert advice.signal("oscillating_conflict").status == "watch"
    assert len(advice.examples) == 1 and sorted(advice.examples[0].ids) == [0, 1, 2, 3, 4]
    assert advice.examples[0] == conflicting_examples(tally, "a", "b")
    assert "pass sample_ids=" not in advice.reason
    summary = advice.summary().splitlines()
    assert summary[-1] == f"examples: {advice.examples[0].sentence()}"
    assert "examples that carry the conflict" in str(advice)
    assert advice.to_dict()["examples"][0]["push_share"] == pytest.approx(500 / 600)
    assert html.escape(advice.examples[0].sentence()) in advice._repr_html_()  # the notebook's verdict box
    # Without sample_ids nothing is named, and the oscillation's message says how to name them.
    plain = advise(run)
    assert plain.examples == [] and plain.to_dict()["examples"] == []
    assert "pass sample_ids= to monitor.backward to name the examples that carry it" in plain.reason
    assert "examples:" not in plain.summary()


def test_the_advice_names_the_examples_when_no_ceiling_moved(make_report, make_pair):
    def rec(name, a):
        return VariantRecord(name, {"a": [1.0], "b": [1.0]}, [(1, {"a": a, "b": a})], {"a": "min", "b": "min"})

    flat = [ComparisonResult({"shared": rec("shared", s), "independent": rec("independent", s * 0.999)}, ["a", "b"],
                             1, 0, seed=k) for k, s in enumerate((1.0, 0.9, 1.1))]
    fight = [make_report(make_pair(-0.8), step=s) for s in range(20)]  # a persistent conflict: no oscillation
    tally = planted_tally()
    tally.add_pair(("a", "c"), [0, 1], torch.tensor([1.0, -3.0]), torch.tensor([0.0, -1.0]))  # another pair
    assert advise(fight, samples=tally).examples == []  # a split may cure a persistent conflict: nobody named
    advice = advise(fight, samples=tally, comparison=flat)
    assert advice.signal("ceiling").status == "ok" and advice.verdict == "keep_shared"
    # Every attributed pair, the most negative summed inner product first: a/b (-187.5) before a/c (-1).
    assert [e.pair for e in advice.examples] == [("a", "b"), ("a", "c")]
    assert advice.examples[1].ids == (1,) and advice.examples[1].total == pytest.approx(-1.0)
    assert pairs_with_examples(tally) == advice.examples


def test_a_monitored_run_names_mostly_planted_examples(tmp_path):
    path = tmp_path / "run.jsonl"
    monitor, planted, steps = planted_run(path)
    advice = advise(monitor.history)
    assert advice.signal("oscillating_conflict").status == "watch"  # the construction's: a conflict at chance
    (found,) = advice.examples
    named = set(found.ids)
    assert len(named) >= 5 and len(named & planted) / len(named) > 0.5  # chance: 0.05
    assert found.push_share is not None and found.push_share > 0.5
    # The what-if against the per-step attributions themselves: the summed Gram entry (the rules' own Gram), and
    # the named ids' contributions taken out of it.
    total = sum(float(s.gram[0, 1]) for s in steps)
    carried = sum(
        float(s.pushes_apart(0, 1)[n]) / 2 for s in steps for n, i in enumerate(s.ids.tolist()) if i in named
    )
    assert found.total == pytest.approx(total, rel=1e-4, abs=1e-6)
    assert found.without == pytest.approx(total - carried, rel=1e-4, abs=1e-6)
    assert found.removing_cures == (total < 0 <= total - carried)
    # A saved run gives the same advice: History.from_jsonl reads the tally back from the file, in the same pass.
    kept, read = monitor.history.samples.pair("a", "b"), History.from_jsonl(path).samples.pair("a", "b")
    assert read.keys() == kept.keys()
    assert all(read[i]["count"] == kept[i]["count"] and read[i]["push"] == pytest.approx(kept[i]["push"], rel=1e-6)
               for i in kept)
    saved = advise_from_jsonl(path)
    assert saved.examples[0].ids == found.ids
    assert saved.examples[0].push_share == pytest.approx(found.push_share, rel=1e-6)


def test_removing_the_named_examples_removes_the_conflict_and_removing_as_many_others_does_not():
    # Retrain from the same seed without the examples the advice named, and, as a control, without as many examples
    # drawn from those the construction did not plant: the pair's conflict rate over the run (cos(g_a, g_b) < 0 on
    # the whole backbone) falls only in the first case, by a two-sided Fisher exact test on the step counts.
    monitor, planted, _ = planted_run()
    advice = advise(monitor.history)
    assert advice.signal("oscillating_conflict").status == "watch"
    named = set(advice.examples[0].ids)
    others = sorted(set(range(400)) - planted - named)[: len(named)]

    def conflicts(history) -> tuple[int, int]:
        cosine = align(history).cosine[:, 0, 1]
        return int((cosine < 0).sum()), len(cosine)

    before = conflicts(monitor.history)
    without_named, _, _ = planted_run(exclude=named)
    without_others, _, _ = planted_run(exclude=others)
    after, control = conflicts(without_named.history), conflicts(without_others.history)

    def p_value(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float(stats.fisher_exact([[a[0], a[1] - a[0]], [b[0], b[1] - b[0]]]).pvalue)

    assert after[0] / after[1] < before[0] / before[1] and p_value(before, after) < 1e-6
    assert p_value(before, control) > 0.05
    assert advise(without_named.history).signal("oscillating_conflict").status == "ok"
