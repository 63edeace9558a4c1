from __future__ import annotations

import json
import math

import pytest
import torch

from gradconflict import ConflictMonitor, ConflictReport, History
from gradconflict.split import VariantRecord, branch, compare, evaluate_split

from .helpers import MSE, batches, mlp_net


def _history(curves: dict[str, list[float]]) -> History:
    h = History()
    tasks = tuple(curves)
    for step, values in enumerate(zip(*curves.values())):
        h.append(ConflictReport(tasks, torch.eye(len(tasks)), losses=torch.tensor(values), step=step))
    return h


def _record(name, losses, best, params=100, latency=1.0, memory=1.0, latency_cpu=math.nan):
    evals = [(len(losses["a"]), best)]
    return VariantRecord(
        name, losses, evals, dict.fromkeys(best, "min"), params, 1.0, latency, memory, latency_cpu_ms=latency_cpu
    )


def _seeds(gains: list[float], shared: tuple[float, ...] = (1.0, 1.3, 0.7), **costs):
    """One (shared, split) pair of records per seed; the split's final loss is planted ``gain`` % lower."""
    befores, afters = [], []
    for k, (base, gain) in enumerate(zip(shared, gains)):
        curve = {"a": [2.0 + k, 1.5, base]}
        befores.append(_record("shared", curve, {"a": base}))
        after = base * (1 - gain / 100)
        afters.append(_record("branched", {"a": [2.0 + k, 1.5, after]}, {"a": after}, **costs))
    return befores, afters


def test_histories_smoother_and_lower_pass_cost_is_not_measurable():
    def seed(k: int):
        wobble = [1.0, 1.2, 0.9, 1.1, 0.95, 1.05] * 3
        before = _history({"a": [v + 0.01 * k for v in wobble], "b": [2.0, 1.9, 2.1, 1.8, 2.0, 1.9] * 3})
        falling = [1.0 - (0.03 + 0.001 * k) * i for i in range(18)]
        after = _history({"a": falling, "b": [2.0 - 0.05 * i for i in range(18)]})
        return before, after

    runs = [seed(k) for k in range(3)]
    one = evaluate_split(*runs[0])
    assert one.held == ["convergence"] and one.failed == []
    assert one["ceiling"].passed is None  # one run: a gain above the floor, but no seeds to test it on
    assert one["cost"].passed is None and "no cost" in one["cost"].evidence
    verdict = evaluate_split([b for b, _ in runs], [a for _, a in runs])  # three seeds, paired in order
    assert verdict.held == ["convergence", "ceiling"] and verdict.failed == []
    json.dumps(verdict.to_dict())
    text = str(verdict)
    assert "convergence: held" in text and "cost: n/a" in text


def test_the_ceiling_is_a_paired_test_across_seeds_with_a_floor():
    # a consistent +27% on every seed, far inside the shared model's own seed-to-seed spread (about 30%)
    befores, afters = _seeds([25.5, 26.0, 29.4])
    assert evaluate_split(befores, afters)["ceiling"].passed is True
    # ahead on every seed, in the fourth digit: no gain
    befores, afters = _seeds([0.04, 0.03, 0.05])
    assert evaluate_split(befores, afters)["ceiling"].passed is False
    assert evaluate_split(befores[0], afters[0])["ceiling"].passed is False  # under the floor even on one seed
    # one lucky seed: three seeds cannot tell (at a spread as small as three seeds allow, 20 would confirm it)
    befores, afters = _seeds([40.0, -5.0, -3.0])
    unsure = evaluate_split(befores, afters)["ceiling"]
    assert unsure.passed is None
    assert "cannot tell yet" in unsure.evidence and "one seed" not in unsure.evidence  # three seeds, not one
    assert "run more seeds to judge the gain (about 20 in all)" in unsure.evidence
    # barely above the floor at a wide spread: no gain worth a split
    befores, afters = _seeds([6.0, -4.0, 2.0])
    assert evaluate_split(befores, afters)["ceiling"].passed is False
    # seeds that change nothing: the same run three times cannot confirm a gain
    befores, afters = _seeds([30.0] * 3, shared=(1.0, 1.0, 1.0))
    same = evaluate_split([befores[0]] * 3, [afters[0]] * 3)
    assert same["ceiling"].passed is None


def test_cost_is_judged_on_cpu_time_where_measured():
    # a loaded machine stretched the split's wall time tenfold; its CPU time grew 1.5 times
    befores, afters = _seeds([20.0, 21.0, 22.0], latency=10.0, latency_cpu=1.5)
    for record in befores:
        record.latency_cpu_ms = 1.0
    cost = evaluate_split(befores, afters)["cost"]
    assert cost.passed is True and "latency (CPU time) x1.50" in cost.evidence
    for record in befores:
        record.latency_cpu_ms = math.nan  # no CPU time: the wall time is all there is
    assert evaluate_split(befores, afters)["cost"].passed is False


def test_failures_carry_their_warnings():
    smooth = {"a": [1.0, 0.9, 0.8, 0.7], "b": [1.0, 0.9, 0.8, 0.7]}
    bumpy = {"a": [1.0, 1.5, 0.9, 1.6], "b": [1.0, 1.4, 0.9, 1.5]}
    before = _record("shared", smooth, {"a": 0.5, "b": 0.5})
    after = _record("branched", bumpy, {"a": 0.6, "b": 0.5}, params=300, latency=2.5, memory=1.5)
    verdict = evaluate_split(before, after, span=1)
    assert verdict.failed == ["convergence", "ceiling", "cost"]
    assert "params x3.00" in verdict["cost"].evidence and "latency (wall time) x2.50" in verdict["cost"].evidence
    text = str(verdict)
    assert "the trouble is the data, not the sharing" in text
    assert "capacity was not the limit" in text and "cannot carry the copies" in text
    assert evaluate_split(before, after, max_cost_ratio=4.0)["cost"].passed


def test_comparison_results_and_real_monitor_histories():
    res = compare(mlp_net, MSE, batches(4), steps=10, branch_at=2, progress=False, variants=("shared", "branched"))
    verdict = evaluate_split(res, "branched")
    assert [c.name for c in verdict.criteria] == ["convergence", "ceiling", "cost"]
    assert verdict["cost"].passed is not None and "params x" in verdict["cost"].evidence
    assert evaluate_split(res["shared"], res["branched"]).to_dict() == verdict.to_dict()

    def monitored(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = ConflictMonitor(model)
        for x, y in batches(4) * 2:
            out = model(x)
            opt.zero_grad()
            monitor.backward({t: MSE[t](out[t], y[t]) for t in out})
            opt.step()
        monitor.close()
        return monitor.history

    torch.manual_seed(0)
    net = mlp_net()
    before = monitored(net)
    after = monitored(branch(net, at=2))
    assert evaluate_split(before, after)["ceiling"].passed is not True  # one run cannot confirm a gain


def test_a_history_is_judged_whole_next_to_a_record():
    bumpy = [1.0, 1.5, 0.9, 1.6, 0.8, 0.7, 0.6, 0.5]
    record = _record("lora", {"a": [0.5] * 4 + [0.4, 0.3, 0.2, 0.1]}, {"a": 0.1})
    record.start = 4
    verdict = evaluate_split(_history({"a": bumpy}), record, span=1)
    assert "a 29% -> 0%" in verdict["convergence"].evidence  # the history's rises counted from its first step


def test_bad_inputs():
    h = _history({"a": [1.0, 0.9, 0.8]})
    with pytest.raises(TypeError, match="variant name"):
        evaluate_split(h, "lora")
    with pytest.raises(TypeError, match="History or a compare"):
        evaluate_split(h, 3.0)
    with pytest.raises(TypeError, match="lists of runs"):
        evaluate_split(h, [h])
    with pytest.raises(ValueError, match="one per seed"):
        evaluate_split([h, h], [h])
    with pytest.raises(ValueError, match="share no task"):
        evaluate_split(h, _history({"b": [1.0, 0.9, 0.8]}))
    with pytest.raises(ValueError, match="no losses"):
        evaluate_split(History(), h)
    assert evaluate_split(_history({"a": [1.0, 0.9]}), _history({"a": [1.0, 0.9]}))["convergence"].passed is None
