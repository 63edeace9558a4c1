"""Carry out and judge the split of a shared multi-task backbone: the three steps of splitting, one call each.

1. :func:`compare`: the comparison experiment (all shared, fully independent, per-task LoRA, branched).
2. :func:`lora_split`: the logical split, one LoRA adapter per task on a frozen backbone.
3. :func:`branch`: the physical split, one copy of the upper backbone per task group.

Then :func:`evaluate_split` judges the split on the three criteria (convergence, ceiling, cost). Every "does a split
beat the shared model?" in the package is :func:`judge_gain`'s answer.

>>> from gradconflict.split import MultiTaskNet, branch, compare, delta_m, evaluate_split, lora_split
"""

from __future__ import annotations

from gradconflict.records.comparison import (
    GAIN_FLOOR,
    ComparisonResult,
    GainTest,
    IdenticalSeedsWarning,
    SplitGain,
    VariantRecord,
    judge_gain,
    split_gains,
)
from gradconflict.records.measures import Smoothness, delta_m, smoothness
from gradconflict.split.branch import BranchedNet, branch, duplicated_share
from gradconflict.split.compare import VARIANTS, compare
from gradconflict.split.evaluate import Criterion, SplitEvaluation, evaluate_split
from gradconflict.split.lora import LoRALayer, LoRASplit, lora_split
from gradconflict.split.model import MultiTaskNet

__all__ = [
    "GAIN_FLOOR",
    "VARIANTS",
    "BranchedNet",
    "ComparisonResult",
    "Criterion",
    "GainTest",
    "IdenticalSeedsWarning",
    "LoRALayer",
    "LoRASplit",
    "MultiTaskNet",
    "Smoothness",
    "SplitEvaluation",
    "SplitGain",
    "VariantRecord",
    "branch",
    "compare",
    "delta_m",
    "duplicated_share",
    "evaluate_split",
    "judge_gain",
    "lora_split",
    "smoothness",
    "split_gains",
]
