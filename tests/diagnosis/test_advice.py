import ast
import json

import pytest
import torch
from torch import nn

from gradconflict import History
from gradconflict.diagnosis import Advice, Thresholds, advise, advise_from_jsonl, next_step_code


def _run(make_report, make_pair, top_cos, bottom_cos=0.8, steps=12):
    reports = []
    for s in range(steps):
        top, bottom = make_pair(top_cos), make_pair(bottom_cos)
        reports.append(make_report(top + bottom, step=s, layers={"body.1": (top, 20), "body.0": (bottom, 60)}))
    return reports


def test_keep_shared_when_tasks_agree(make_report, make_pair):
    advice = advise(_run(make_report, make_pair, top_cos=0.6))
    assert isinstance(advice, Advice)
    assert (advice.verdict, advice.branch_point, advice.groups) == ("keep_shared", None, [["a", "b"]])
    assert [s.status for s in advice.signals] == ["ok", "n/a", "ok", "ok"]
    assert advice.duplicated_share == 0.0
    ast.parse(advice.next_step)
    # The check for a keep_shared advice: fully independent models, one per task.
    assert "branch_at='body.0'" in advice.next_step and "groups=[['a'], ['b']]" in advice.next_step


def test_physical_split_at_the_conflicting_depth(make_report, make_pair):
    advice = advise(_run(make_report, make_pair, top_cos=-0.9, bottom_cos=0.1))
    assert (advice.verdict, advice.branch_point, advice.groups) == ("physical_split", "body.1", [["a"], ["b"]])
    assert advice.duplicated_share == pytest.approx(0.25)
    assert advice.signal("diverging_objectives").status == "split"
    assert "branch_at='body.1'" in advice.next_step
    text = str(advice)
    for part in ("verdict: physical_split", "branch point: body.1", "signals:", "layer conflict profile", "next step:"):
        assert part in text
    data = json.loads(json.dumps(advice.to_dict()))
    assert data["verdict"] == "physical_split" and data["profile"]["layers"][1]["name"] == "body.1"
    assert {s["name"] for s in data["signals"]} == {
        "diverging_objectives", "heavy_heads", "zero_sum", "single_point_of_risk"
    }
    with pytest.raises(KeyError):
        advice.signal("nope")


def test_lora_split_when_signals_alarm_without_a_branch_depth(make_report, make_pair):
    # Gradients agree, but the evaluations trade one task for the other: adapters, one per task.
    trading = [{"a": 0.80, "b": 0.70}, {"a": 0.83, "b": 0.68}, {"a": 0.80, "b": 0.71}]
    advice = advise(_run(make_report, make_pair, top_cos=0.6), evaluations=trading)
    assert (advice.verdict, advice.branch_point, advice.groups) == ("lora_split", None, [["a"], ["b"]])
    assert "zero_sum" in advice.reason and "branch_at=None" in advice.next_step
    # Diverging objectives but reports without layers: no depth to branch at.
    bare = [make_report(make_pair(-0.9), step=s) for s in range(10)]
    advice = advise(bare)
    assert advice.verdict == "lora_split" and advice.profile is None


def test_thresholds_override_and_errors(make_report, make_pair):
    run = _run(make_report, make_pair, top_cos=-0.05, bottom_cos=-0.05)
    assert advise(run).verdict == "physical_split"  # PCGrad's S = 0
    relaxed = {"conflict_cosine": -0.1}  # Recon's S
    assert advise(run, thresholds=relaxed).verdict == "keep_shared"
    assert "keep an eye on" in advise(run, thresholds=relaxed).reason
    assert advise(run, thresholds=Thresholds(**relaxed)).verdict == "keep_shared"
    # S defaults to the threshold the run was measured with (ConflictMonitor(threshold=-0.1)).
    for r in run:
        r.threshold = -0.1
    assert advise(run).verdict == "keep_shared"
    assert advise(run, thresholds={"conflict_cosine": 0.0}).verdict == "physical_split"
    assert advise(run, thresholds=Thresholds()).verdict == "physical_split"
    with pytest.raises(ValueError, match="unknown threshold"):
        advise(run, thresholds={"nope": 1})
    with pytest.raises(ValueError, match="no measured step"):
        advise([])
    with pytest.raises(ValueError, match="needs model"):
        advise(run, lookahead=lambda: {})


def test_exact_lookahead_feeds_signal_four_and_groups(make_report, make_pair):
    torch.manual_seed(0)
    body, head = nn.Linear(3, 4), nn.Linear(4, 1)
    model = nn.Sequential(body, head)
    x = torch.randn(16, 3)

    def losses():
        out = model(x).squeeze(-1)
        return {"b": (out + x[:, 0]).pow(2).mean(), "a": (out - x[:, 0]).pow(2).mean()}  # opposed

    advice = advise(_run(make_report, make_pair, top_cos=0.6), model=model, lookahead=losses, lr=0.05)
    risk = advice.signal("single_point_of_risk")
    assert risk.details["method"] == "exact lookahead" and risk.status == "split"
    assert advice.verdict == "lora_split" and advice.groups == [["a"], ["b"]]


def test_advise_from_jsonl_round_trip(tmp_path, make_report, make_pair):
    h = History()
    for r in _run(make_report, make_pair, top_cos=-0.9, bottom_cos=0.1):
        h.append(r)
    path = h.to_jsonl(tmp_path / "run.jsonl")
    advice = advise_from_jsonl(path)
    assert (advice.verdict, advice.branch_point) == ("physical_split", "body.1")
    assert advise_from_jsonl(path, thresholds={"layer_conflict": 1.01}).verdict == "lora_split"


def test_next_step_code_is_valid_python():
    for verdict in ("keep_shared", "lora_split", "physical_split"):
        code = next_step_code(verdict, "backbone.4", [["a", "b"], ["c"]])
        ast.parse(code)
        assert "compare(model_factory, loss_fns, train_data, steps=200" in code
        assert "groups=[['a', 'b'], ['c']]" in code and "print(result.to_markdown())" in code


def test_single_task_keeps_shared(make_report):
    G = torch.ones(1, 1, dtype=torch.float64)
    advice = advise([make_report(G, step=s, layers={"x": (G, 3)}) for s in range(3)])
    assert (advice.verdict, advice.groups, advice.branch_point) == ("keep_shared", [["a"]], None)
    assert [s.status for s in advice.signals] == ["n/a", "n/a", "n/a", "n/a"]
    str(advice)
