from __future__ import annotations

import json

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


def _record(name, losses, best, params=100, latency=1.0, memory=1.0):
    evals = [(len(losses["a"]), best)]
    return VariantRecord(name, losses, evals, dict.fromkeys(best, "min"), params, 1.0, latency, memory)


def test_histories_smoother_and_lower_pass_cost_is_not_measurable():
    before = _history({"a": [1.0, 1.2, 0.9, 1.1, 0.95, 1.05] * 3, "b": [2.0, 1.9, 2.1, 1.8, 2.0, 1.9] * 3})
    after = _history({"a": [1.0 - 0.03 * i for i in range(18)], "b": [2.0 - 0.05 * i for i in range(18)]})
    verdict = evaluate_split(before, after)
    assert verdict.held == ["convergence", "ceiling"] and verdict.failed == []
    assert verdict["cost"].passed is None and "no cost" in verdict["cost"].evidence
    json.dumps(verdict.to_dict())
    text = str(verdict)
    assert "convergence: held" in text and "cost: n/a" in text


def test_failures_carry_their_warnings():
    smooth = {"a": [1.0, 0.9, 0.8, 0.7], "b": [1.0, 0.9, 0.8, 0.7]}
    bumpy = {"a": [1.0, 1.5, 0.9, 1.6], "b": [1.0, 1.4, 0.9, 1.5]}
    before = _record("shared", smooth, {"a": 0.5, "b": 0.5})
    after = _record("branched", bumpy, {"a": 0.6, "b": 0.5}, params=300, latency=2.5, memory=1.5)
    verdict = evaluate_split(before, after, span=1)
    assert verdict.failed == ["convergence", "ceiling", "cost"]
    assert "params x3.00" in verdict["cost"].evidence and "latency_ms" in verdict["cost"].evidence
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
    assert evaluate_split(before, after)["ceiling"].passed is not None


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
        evaluate_split(h, [1.0])
    with pytest.raises(ValueError, match="share no task"):
        evaluate_split(h, _history({"b": [1.0, 0.9, 0.8]}))
    with pytest.raises(ValueError, match="no losses"):
        evaluate_split(History(), h)
    assert evaluate_split(_history({"a": [1.0, 0.9]}), _history({"a": [1.0, 0.9]}))["convergence"].passed is None
