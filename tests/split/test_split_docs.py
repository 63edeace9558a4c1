from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "split.md"


def test_the_split_guide_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the guide saves an adapter to the working directory
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 8
    namespace: dict = {}
    for block in blocks:  # the blocks build on each other, as a reader runs them
        exec(compile(block, f"{DOC.name}:python-block", "exec"), namespace)
    pytest.importorskip("pandas")
    assert namespace["result"].to_dataframe().shape[0] == 8
