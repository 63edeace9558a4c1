"""gradconflict: measure how the tasks of a multi-task model fight over their shared backbone, diagnose
whether to split it, and carry out the split.

``import gradconflict`` loads what a training loop needs (the monitor, its reports and history, the JSONL sink)
and nothing more: the diagnosis (scipy), the split toolkit, the plots (matplotlib) and the dashboard sinks' own
libraries load on first use, e.g. when ``gradconflict.advise`` is first read.

>>> from gradconflict import ConflictMonitor, ConflictReport, History, Weighting
>>> import gradconflict
>>> gradconflict.advise.__module__
'gradconflict.diagnosis.advice'
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version
from typing import TYPE_CHECKING, Any

from gradconflict import _moved
from gradconflict.measure.attribution import SampleAttribution
from gradconflict.measure.engine import PerformanceWarning, is_measuring
from gradconflict.measure.report import ConflictReport, LayerReport
from gradconflict.monitor import ConflictMonitor, DetachedTaskWarning, MeasurementWarning
from gradconflict.records.history import History
from gradconflict.records.samples import SampleTally
from gradconflict.records.sinks import JSONLSink
from gradconflict.weighting import Weighting, WeightingError, WeightingWarning

_moved.install()

if TYPE_CHECKING:
    from gradconflict.diagnosis import Advice, Signal, Thresholds, advise, advise_from_jsonl
    from gradconflict.integrations.tensorboard import TensorBoardSink
    from gradconflict.integrations.wandb import WandbSink
    from gradconflict.split import (
        BranchedNet,
        ComparisonResult,
        LoRASplit,
        MultiTaskNet,
        SplitEvaluation,
        delta_m,
        evaluate_split,
        lora_split,
        split_gains,
    )
    from gradconflict.split.branch import branch
    from gradconflict.split.compare import compare


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, the one place it is written)."""
    try:
        return _installed_version("gradconflict")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

#: Public names loaded on first use, and the module that holds each.
_LAZY = {
    **dict.fromkeys(["Advice", "Signal", "Thresholds", "advise", "advise_from_jsonl"], "gradconflict.diagnosis"),
    **dict.fromkeys(
        [
            "BranchedNet", "ComparisonResult", "LoRASplit", "MultiTaskNet", "SplitEvaluation", "branch", "compare",
            "delta_m", "evaluate_split", "lora_split", "split_gains",
        ],
        "gradconflict.split",
    ),
    "TensorBoardSink": "gradconflict.integrations.tensorboard",
    "WandbSink": "gradconflict.integrations.wandb",
}


def __getattr__(name: str) -> Any:
    """Load a public name of the diagnosis or the split toolkit on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradconflict' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Advice",
    "BranchedNet",
    "ComparisonResult",
    "LoRASplit",
    "MultiTaskNet",
    "SplitEvaluation",
    "branch",
    "compare",
    "delta_m",
    "evaluate_split",
    "lora_split",
    "split_gains",
    "ConflictMonitor",
    "ConflictReport",
    "DetachedTaskWarning",
    "History",
    "JSONLSink",
    "LayerReport",
    "MeasurementWarning",
    "PerformanceWarning",
    "SampleAttribution",
    "SampleTally",
    "Signal",
    "TensorBoardSink",
    "Thresholds",
    "Weighting",
    "WeightingError",
    "WeightingWarning",
    "WandbSink",
    "__version__",
    "advise",
    "advise_from_jsonl",
    "is_measuring",
]
