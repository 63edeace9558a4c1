"""The command line: demo (quick) and report, through main() and as `python -m gradconflict`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradconflict.cli import main


def test_demo_then_report(tmp_path, capsys):
    assert main(["demo", "--steps", "30", "--compare-steps", "12", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "final report" in out and "conflict fraction" in out and "verdict" in out and "| variant |" in out
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert json.loads((tmp_path / "advice.json").read_text())["verdict"]
    history = tmp_path / "history.jsonl"
    assert len(history.read_text().splitlines()) == 30
    assert main(["report", str(history)]) == 0
    assert "30 measured steps" in capsys.readouterr().out


def test_report_on_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "gradconflict", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_advise_on_a_saved_history(tmp_path, capsys):

    from gradconflict.synthetic import make_problem

    monitor = make_problem("opposed", seed=0).train(60)
    path = monitor.history.to_jsonl(tmp_path / "run.jsonl")
    assert main(["advise", str(path)]) == 0
    assert "verdict" in capsys.readouterr().out.lower()
    assert main(["advise", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] in {"keep_shared", "lora_split", "physical_split"}
    assert main(["advise", str(path), "--brief"]) == 0
    brief = capsys.readouterr().out
    assert brief.startswith("verdict: ") and "layers in persistent conflict:" in brief
    assert main(["advise", str(path), "--threshold", "nonsense"]) == 2


def _partial_history(path, round_robin=False):
    """12 steps: a and b on every step (cosine -0.8, listed b first on odd steps), c with them on steps 0, 4, 8
    (cosine +0.6 with both); with ``round_robin``, one task per step instead."""
    import torch

    from gradconflict import ConflictReport, History, LayerReport

    cos = torch.tensor([[1.0, -0.8, 0.6], [-0.8, 1.0, 0.6], [0.6, 0.6, 1.0]], dtype=torch.float64)
    history = History()
    for s in range(12):
        names = "abc"[s % 3] if round_robin else ("abc" if s % 4 == 0 else "ba" if s % 2 else "ab")
        index = torch.tensor(["abc".index(t) for t in names])
        G = cos[index][:, index]
        layers = {"body": LayerReport("body", tuple(names), G, num_params=6)}
        history.append(ConflictReport(tuple(names), G, losses=torch.ones(len(names)), layers=layers, step=s))
    return history.to_jsonl(path)


def test_report_and_advise_on_partial_steps(tmp_path, capsys):
    path = _partial_history(tmp_path / "partial.jsonl")
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tasks (measured steps carrying each): a 12, b 12, c 3 of 12" in out
    assert "pairs measured together: a/b 12, a/c 3, b/c 3 of 12" in out
    assert out.splitlines()[-1].startswith("12 measured steps of 12")
    assert main(["advise", str(path)]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "a and b conflict (cosine < 0) on 100% of 12 measured steps" in out
    assert main(["advise", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    diverging = next(s for s in data["signals"] if s["name"] == "diverging_objectives")
    assert diverging["details"]["persistence"] == {"a/b": 1.0, "a/c": 0.0, "b/c": 0.0}
    assert diverging["details"]["together"] == {"a/b": 12, "a/c": 3, "b/c": 3}


def test_report_and_advise_on_round_robin_steps(tmp_path, capsys):
    path = _partial_history(tmp_path / "rr.jsonl", round_robin=True)
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pairs measured together: a/b 0, a/c 0, b/c 0 of 12" in out
    assert "warning: no measured step carried two tasks together" in out
    assert main(["advise", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert data["verdict"] == "keep_shared" and data["groups"] == [["a", "b", "c"]]
    assert "could not be measured" in data["reason"]
    assert [s["status"] for s in data["signals"]] == ["n/a"] * 6
