"""The command line: demo (quick) and report, through main() and as `python -m gradconflict`."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert main(["advise", str(path), "--threshold", "nonsense"]) == 2
