"""The README's quickstart, every page of the docs and every example script run as written; the docs name no file
outside the repository."""

from __future__ import annotations

import doctest
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


#: The pages a reader runs code from: the README and every page of the docs but the index (which shows the README).
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if p.name != "index.md")]


@pytest.mark.parametrize("doc", PAGES)
def test_markdown_python_blocks_run(doc, tmp_path, monkeypatch):
    """Plain blocks run in order in one namespace, as a reader runs them; ``>>>`` blocks are doctests."""
    monkeypatch.chdir(tmp_path)
    path = ROOT / doc
    blocks = python_blocks(path)
    assert blocks, f"{doc} shows no Python example"
    namespace: dict = {}
    for block in blocks:
        if not block.lstrip().startswith(">>>"):
            exec(compile(block, f"{doc}:python-block", "exec"), namespace)
    if any(block.lstrip().startswith(">>>") for block in blocks):
        result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+", text)]


def _two_tasks(namespace: dict, out: str) -> None:
    """Agreement first, then a conflict that persists: the cosine of the last 50 steps near -1, every step."""
    cosines = namespace["cosines"]
    history = namespace["monitor"].history
    assert len(cosines) == 200 and [r.step for r in history] == list(range(200))
    assert [float(r.cosine[0, 1]) for r in history] == pytest.approx(cosines)  # what it printed is what it saved
    assert sum(cosines[:20]) / 20 > 0.5 and max(cosines[-50:]) < -0.5
    line = next(x for x in out.splitlines() if x.startswith("mean cosine"))
    assert _numbers(line) == pytest.approx([round(sum(cosines[:20]) / 20, 2), round(sum(cosines[-50:]) / 50, 2)])
    assert history.ema["conflict_fraction"] >= 1 - 0.9**50  # the last 50 steps all in conflict (decay 0.9)


def _ddp(namespace: dict, out: str) -> None:
    """One process (a group of one): the two tasks' gradients point against each other, cosine near -1."""
    assert out.splitlines()[0] == "1 rank(s), sync=none (one process)"
    average = _numbers(next(x for x in out.splitlines() if x.startswith("moving average of the cosine")))
    assert len(average) == 1 and average[0] < -0.9


def _printed_cosines(out: str) -> dict[int, float]:
    """``{step: cosine}`` of the lines ``step  5: ... cos(x, y) +0.123, ...`` an example prints."""
    found = re.findall(r"^step +(\d+):.*cos\(\w+, \w+\) ([-+]\d\.\d+)", out, flags=re.M)
    return {int(step): float(cos) for step, cos in found}


def _measured_cosines(monitor) -> dict[int, float]:
    return {r.step: float(r.cosine[0, 1]) for r in monitor.history.measured}


def _huggingface(namespace: dict, out: str) -> None:
    """The Trainer's log entries of steps 5, 10, 15 and 20 carry the measured steps' figures; then the advice."""
    assert [row["step"] for row in namespace["logged"]] == [5, 10, 15, 20]
    printed = _printed_cosines(out)
    measured = _measured_cosines(namespace["trainer"].conflict_monitor)  # the Trainer counts from 1, the monitor 0
    assert list(printed) == [5, 10, 15, 20] and len(measured) == 4
    assert list(printed.values()) == pytest.approx([round(c, 3) for c in measured.values()], abs=1e-9)
    assert namespace["advice"].verdict in {"keep_shared", "lora_split", "physical_split"}
    assert f"advice: {namespace['advice'].verdict} (" in out


def _lightning(namespace: dict, out: str) -> None:
    """The CSV logger holds the figures of steps 9, 19, 29 and 39, those the monitor measured."""
    assert [int(row["step"]) for row in namespace["rows"]] == [9, 19, 29, 39]
    monitor = namespace["callback"].monitor
    printed, measured = _printed_cosines(out), _measured_cosines(monitor)
    assert list(printed) == [9, 19, 29, 39] and len(measured) == 4 and monitor.closed  # logged after each step
    assert list(printed.values()) == pytest.approx([round(c, 3) for c in measured.values()], abs=1e-9)
    assert "closed: True" in out


#: What each example promises in its docstring, checked on its namespace and what it printed.
EXAMPLES = {
    "ddp.py": _ddp,
    "huggingface_trainer.py": _huggingface,
    "lightning_two_tasks.py": _lightning,
    "train_two_tasks.py": _two_tasks,
}


def test_every_example_has_a_check():
    assert sorted(EXAMPLES) == sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_examples_run_and_do_what_they_say(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script])
    namespace = runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    EXAMPLES[script](namespace, capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left in the working directory


def test_the_docs_point_to_nothing_outside_the_repository():
    """The docs and the code carry everything a user needs: no page or docstring points to a design document
    that is not in the repository."""
    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "gradconflict").rglob("*.py")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for pointer in ("DESIGN.md", "../shared", "the document", "seed document"):
            assert pointer not in text, f"{path.relative_to(ROOT)} points to {pointer!r}"
