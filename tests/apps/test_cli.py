"""The command line: demo (quick), report (text, HTML, PNG) and advise, through main() and as
`python -m gradconflict`; --version, plain help text, and a reader that stops early."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gradconflict.apps.cli import main
from gradconflict.diagnosis.signals import SIGNALS


def test_demo_then_report(tmp_path, capsys):
    assert main(["demo", "--steps", "30", "--compare-steps", "12", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "final report" in out and "conflict fraction" in out and "verdict" in out and "| variant |" in out
    assert "\r" not in out + captured.err  # output that is not a terminal gets no progress bar
    assert "  step 0: conflict" in out  # the per-step lines
    assert "does not reach the model's initialisation" not in out  # compare(seed=) seeds the demo model
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert json.loads((tmp_path / "advice.json").read_text())["verdict"]
    history = tmp_path / "history.jsonl"
    assert len(history.read_text().splitlines()) == 30
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "<h2>Comparison experiment</h2>" in page
    assert main(["report", str(history)]) == 0
    out = capsys.readouterr().out
    assert "30 steps (30 measured, 0 skipped), steps 0 to 29; tasks contrary, left, right" in out
    assert "left/right" in out and "layer conflict profile" in out and "advice: " in out


def test_demo_model_leaves_the_global_rng_as_it_found_it():
    from gradconflict.apps.demo import demo_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = demo_model(seed=5), demo_model(seed=5)
    assert torch.equal(torch.rand(3), expected)  # the global stream continues where the seed left it
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # the seed alone decides


def test_quiet_demo_prints_the_results_only(tmp_path, capsys):
    assert main(["demo", "--steps", "6", "--compare-steps", "0", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "final report" in out and "saved: " in out
    assert "step 0: conflict" not in out and "step 5: conflict" not in out


def test_report_on_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "gradconflict", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_advise_on_a_saved_history(tmp_path, capsys):

    from gradconflict.fixtures.synthetic import make_problem

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
    # each pair over the steps that carried both: a/b at cosine -0.8 on all 12, a/c and b/c at +0.6 on 3
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:3] in ("a/b", "a/c", "b/c")}
    assert rows["a/b"][:3] == ["12", "-0.800", "100%"] and rows["a/c"][:3] == ["3", "+0.600", "0%"]
    assert rows["b/c"][:3] == ["3", "+0.600", "0%"]
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
    assert [s["status"] for s in data["signals"]] == ["n/a"] * len(SIGNALS)


def test_report_writes_the_html_page_and_the_figures(tmp_path, capsys):
    path = _partial_history(tmp_path / "partial.jsonl")
    html, figures = tmp_path / "out" / "report.html", tmp_path / "figures"
    assert main(["report", str(path), "-o", str(html), "--png", str(figures)]) == 0
    assert f"report: {html}" in capsys.readouterr().out
    assert "pairs measured together: a/b 12, a/c 3, b/c 3 of 12" in html.read_text()
    names = sorted(p.name for p in figures.glob("*.png"))
    assert names == sorted(f"{n}.png" for n in ("cosines", "cancellation", "norms", "layers", "profile",
                                                "mean_cosine", "affinity"))
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures.glob("*.png"))
    only = tmp_path / "only-png"
    assert main(["report", str(path), "--png", str(only)]) == 0  # figures without the page
    assert len(list(only.glob("*.png"))) == 7


def test_report_of_a_round_robin_run_writes_a_page_that_says_what_was_not_measured(tmp_path, capsys):
    path = _partial_history(tmp_path / "rr.jsonl", round_robin=True)
    assert main(["report", str(path), "-o", str(tmp_path / "rr.html")]) == 0
    page = (tmp_path / "rr.html").read_text()
    assert "no measured step carried two tasks together" in page and "Keep the backbone shared" in page


def test_version_matches_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"gradconflict {version('gradconflict')}"


@pytest.mark.parametrize("command", [[], ["demo"], ["report"], ["advise"]])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "usage: gradconflict" in out
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", ":attr:"):
        assert markup not in out


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`gradconflict report RUN.jsonl --lines 1200 | head -1`: about twice what a pipe holds, so the command
    writes into a closed pipe once the reader has gone."""
    import torch

    from gradconflict import ConflictReport, History

    history = History(max_history=None)
    for s in range(1200):
        history.append(ConflictReport("ab", torch.tensor([[1.0, -0.1], [-0.1, 1.0]]), step=s))
    path = history.to_jsonl(tmp_path / "long.jsonl")
    command = [sys.executable, "-m", "gradconflict", "report", str(path), "--lines", "1200"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()  # the reader goes away, as `head -1` does
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 141
    assert first.startswith(str(path).encode()) and err == b""


def _foreign(tmp_path, change):
    """A two-line history whose second line is changed by ``change`` (a dict edit)."""
    path = _partial_history(tmp_path / "run.jsonl")
    first, second = path.read_text().splitlines()[:2]
    data = json.loads(second)
    change(data)
    path.write_text(first + "\n" + json.dumps(data) + "\n")
    return path


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.update(layers=[1, 2]), "'layers' must be an object"),
        (lambda d: d.update(gram=[[1.0]]), "'gram' must be a 2 x 2"),
        (lambda d: d.update(weights=[1.0]), "'weights' must be a list"),
    ],
)
@pytest.mark.parametrize("command", ["report", "advise"])
def test_a_line_of_the_wrong_schema_is_one_line_and_status_2(tmp_path, capsys, change, says, command):
    path = _foreign(tmp_path, change)
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    line = f"gradconflict {command}: {tmp_path}/run.jsonl:2 is not a gradconflict history line: {says}"
    assert captured.err.startswith(line)


@pytest.mark.parametrize("command", ["report", "advise"])
def test_a_folder_or_an_output_under_a_file_is_one_line_and_status_2(tmp_path, capsys, command):
    assert main([command, str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"gradconflict {command}: {tmp_path}: is a directory\n"
    path = _partial_history(tmp_path / "run.jsonl")
    for option in ("-o", "--png"):
        if command == "report":
            assert main(["report", str(path), option, str(path / "sub" / "report.html")]) == 2
            captured = capsys.readouterr()
            assert captured.out == ""
            said = f"cannot write {path}/sub/report.html: {path} is a file, not a folder"
            assert captured.err == f"gradconflict report: {said}\n"


def test_a_run_cut_by_a_crash_is_reported_with_a_one_line_warning(tmp_path, capsys):
    path = _partial_history(tmp_path / "run.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:5], lines[5][:30], *lines[6:]]) + "\n")
    assert main(["report", str(path)]) == 0
    captured = capsys.readouterr()
    assert "11 steps (11 measured, 0 skipped)" in captured.out
    warning, = captured.err.splitlines()
    assert warning.startswith(f"gradconflict report: warning: {path}, line 6 is not JSON")
    in_a_subprocess = subprocess.run(
        [sys.executable, "-m", "gradconflict", "advise", str(path), "--brief"], capture_output=True, text=True
    )
    assert in_a_subprocess.returncode == 0 and in_a_subprocess.stdout.startswith("verdict: ")
    assert in_a_subprocess.stderr.splitlines() == [warning.replace("report", "advise", 1)]


@pytest.mark.slow  # reads 10^5 JSONL lines (about 500 MB); the 10^6 row is benchmarks/long_run.py's
def test_report_and_advise_on_a_hundred_thousand_steps(tmp_path):
    """`gradconflict report` used to ask for 37 GiB here (every pairwise slope of the trend); its trends now use
    bin means, and it reports the trend the run was built with (the conflict between a and b deepening)."""
    from benchmarks.long_run import write_history

    path = tmp_path / "long.jsonl"
    write_history(path, 100_000, tasks=3, layers=4, distinct=200)
    from gradconflict.diagnosis import advise_from_jsonl

    advice = advise_from_jsonl(path)
    worst = advice.trends["worst_cosine"].trend
    assert (worst.n, worst.steps) == (2048, 100_000) and worst.falling(0.05)
    done = subprocess.run([sys.executable, "-m", "gradconflict", "report", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"{path}: 100000 steps (100000 measured, 0 skipped)")


def test_report_aligns_the_run_once(tmp_path, capsys, monkeypatch):
    # The advice, the summary and the HTML page read one alignment of the saved history, made from its stacked
    # records (no list of reports).
    from gradconflict.diagnosis import aligned

    path = _partial_history(tmp_path / "partial.jsonl")
    calls = {"history": 0, "reports": 0}
    by_history, by_reports = aligned._blocks_of_history, aligned._blocks_of_reports

    def count(kind, real):
        def counted(run):
            calls[kind] += 1
            return real(run)

        return counted

    monkeypatch.setattr(aligned, "_blocks_of_history", count("history", by_history))
    monkeypatch.setattr(aligned, "_blocks_of_reports", count("reports", by_reports))
    assert main(["report", str(path), "-o", str(tmp_path / "report.html")]) == 0
    assert calls == {"history": 1, "reports": 0}


@pytest.mark.parametrize("glibc", [True, False])
def test_reading_commands_map_large_allocations_on_glibc_and_restore_its_threshold(tmp_path, monkeypatch, glibc):
    # glibc's M_MMAP_THRESHOLD (mallopt option -3) is set to 4 MiB while the command runs and back to its start
    # value, 128 KiB, after; elsewhere nothing is called.
    import ctypes

    import torch

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    if glibc:
        Libc.gnu_get_libc_version = lambda self: b"2.36"
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    from gradconflict import ConflictReport, History

    history = History()
    history.append(ConflictReport("ab", torch.tensor([[1.0, -0.5], [-0.5, 1.0]])))
    path = history.to_jsonl(tmp_path / "run.jsonl")
    assert main(["report", str(path)]) == 0
    assert calls == ([(-3, 4 << 20), (-3, 128 << 10)] if glibc else [])
