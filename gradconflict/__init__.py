"""gradconflict: measure how the tasks of a multi-task model fight over their shared backbone, diagnose
whether to split it, and carry out the split.

>>> from gradconflict import ConflictMonitor, ConflictReport, History, Weighting
"""

from __future__ import annotations

from gradconflict.diagnosis import Advice, Signal, Thresholds, advise, advise_from_jsonl
from gradconflict.engine import PerformanceWarning, is_measuring
from gradconflict.history import History
from gradconflict.monitor import ConflictMonitor, MeasurementWarning
from gradconflict.report import ConflictReport, LayerReport
from gradconflict.sinks import JSONLSink
from gradconflict.split import (
    BranchedNet,
    ComparisonResult,
    LoRASplit,
    MultiTaskNet,
    SplitEvaluation,
    branch,
    compare,
    delta_m,
    evaluate_split,
    lora_split,
)
from gradconflict.weighting import Weighting, WeightingError, WeightingWarning

__version__ = "0.1.0"

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
    "ConflictMonitor",
    "ConflictReport",
    "History",
    "JSONLSink",
    "LayerReport",
    "MeasurementWarning",
    "PerformanceWarning",
    "Signal",
    "Thresholds",
    "Weighting",
    "WeightingError",
    "WeightingWarning",
    "__version__",
    "advise",
    "advise_from_jsonl",
    "is_measuring",
]
