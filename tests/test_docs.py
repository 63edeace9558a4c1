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


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left in the working directory


def test_the_docs_point_to_nothing_outside_the_repository():
    """The docs and the code carry everything a user needs: no page or docstring points to a design document
    that is not in the repository."""
    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "gradconflict").rglob("*.py")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for pointer in ("DESIGN.md", "../shared", "the document", "seed document"):
            assert pointer not in text, f"{path.relative_to(ROOT)} points to {pointer!r}"
