"""``import gradconflict`` stays light: the diagnosis, split toolkit, plots and dashboard libraries load on first
use, and every public name is still there; the version is the installed package's."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import gradconflict

HEAVY = ["scipy", "matplotlib", "tensorboard", "wandb", "pandas", "sklearn", "gradconflict.diagnosis",
         "gradconflict.split", "gradconflict.reporting.plots", "gradconflict.reporting.html"]


def _loaded_after(code: str) -> list[str]:
    check = f"import sys\n{code}\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    return eval(done.stdout.strip().splitlines()[-1])


def test_import_and_a_monitored_step_with_a_jsonl_sink_load_nothing_heavy(tmp_path):
    code = f"""
import torch, gradconflict
assert not any(m in sys.modules for m in {HEAVY!r}), "import gradconflict loaded a heavy module"
from torch import nn
backbone = nn.Linear(3, 4)
model = nn.ModuleDict({{"backbone": backbone, "heads": nn.ModuleDict({{"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}})}})
with gradconflict.ConflictMonitor(model, sinks=[gradconflict.JSONLSink({str(tmp_path / "run.jsonl")!r})]) as m:
    h = backbone(torch.randn(8, 3))
    m.backward({{t: model["heads"][t](h).pow(2).mean() for t in "ab"}})
"""
    assert _loaded_after(code) == []


def test_every_public_name_is_reachable_and_loads_its_part_on_first_use():
    # the diagnosis reads comparison results from the run's records, not from the split toolkit above it
    assert _loaded_after("from gradconflict import advise") == ["scipy", "gradconflict.diagnosis"]
    for name in gradconflict.__all__:
        assert getattr(gradconflict, name) is not None
    assert set(gradconflict.__all__) <= set(dir(gradconflict))
    from gradconflict.split import lora_split

    assert gradconflict.lora_split is lora_split


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        gradconflict.nonsense  # noqa: B018


def test_the_version_is_the_installed_packages(capsys):
    """Written once, in pyproject.toml: the package reads it from its metadata (CI's .ci/package checks that an
    installed wheel reports the version its name carries)."""
    installed = importlib.metadata.version("gradconflict")
    assert gradconflict.__version__ == installed
    from gradconflict.apps.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"gradconflict {installed}"
