"""The README's quickstart and every example script run as written."""

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


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
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
