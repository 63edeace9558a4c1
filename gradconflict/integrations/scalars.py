"""One measured step as flat, named scalars, the form a framework's logger takes.

>>> import torch
>>> from gradconflict import ConflictReport
>>> report = ConflictReport(("a", "b"), torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))  # cos -1/2; 1 - sqrt(3)/3
>>> {k: round(float(v), 3) for k, v in report_scalars(report).items() if "/cos/" in k or "cancel" in k}
{'conflict/cancellation': 0.423, 'conflict/cos/a-b': -0.5}
"""

from __future__ import annotations

from torch import Tensor

from gradconflict.history import worst_cosine
from gradconflict.report import ConflictReport

__all__ = ["report_scalars"]


def report_scalars(report: ConflictReport, *, layers: bool = True) -> dict[str, Tensor]:
    """The step's metrics as ``{tag: 0-dim tensor}`` (on the model's device: nothing waits for it).

    Tags: ``conflict/cancellation``, ``conflict/update_norm``, ``conflict/norm/<task>``; with two or more tasks
    also ``conflict/conflict_fraction``, ``conflict/worst_cosine``, ``conflict/cos/<a>-<b>`` for each pair (names
    sorted), ``conflict/alignment/<task>`` and, with ``layers``, ``conflict/layer/<name>/worst_cosine``. A skipped
    step has none.
    """
    if report.skipped:
        return {}
    out = {"conflict/cancellation": report.cancellation, "conflict/update_norm": report.update_norm}
    tasks = report.tasks
    out.update({f"conflict/norm/{t}": report.task_norms[i] for i, t in enumerate(tasks)})
    if len(tasks) < 2:
        return out
    out["conflict/conflict_fraction"] = report.conflict_fraction
    out["conflict/worst_cosine"] = worst_cosine(report)
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            first, second = sorted((a, tasks[j]))
            out[f"conflict/cos/{first}-{second}"] = report.cosine[i, j]
    out.update({f"conflict/alignment/{t}": report.alignment[i] for i, t in enumerate(tasks)})
    if layers:
        out.update({f"conflict/layer/{name}/worst_cosine": worst_cosine(lay) for name, lay in report.layers.items()})
    return out
