"""One measured step as flat, named scalars, the form a framework's logger takes.

>>> import torch
>>> from gradconflict import ConflictReport
>>> report = ConflictReport(("a", "b"), torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))  # cos -1/2; 1 - sqrt(3)/3
>>> {k: round(float(v), 3) for k, v in report_scalars(report).items() if "/cos/" in k or "cancel" in k}
{'conflict/cancellation': 0.423, 'conflict/cos/a/b': -0.5}
"""

from __future__ import annotations

from torch import Tensor

from gradconflict.measure.report import ConflictReport
from gradconflict.records.sinks.scalars import tensor_scalars

__all__ = ["report_scalars"]


def report_scalars(report: ConflictReport, *, layers: bool = True) -> dict[str, Tensor]:
    """The step's quantities as ``{"conflict/<key>": 0-dim tensor}`` (on the model's device: nothing waits for
    it), with the keys of :mod:`gradconflict.records.sinks.scalars`, the ones a TensorBoard or W&B sink writes.
    A skipped step has none."""
    if report.skipped:
        return {}
    return {f"conflict/{k}": v for k, v in tensor_scalars(report, layers=layers).items()}
