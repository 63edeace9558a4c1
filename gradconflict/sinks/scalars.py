"""One step's numbers as flat, named scalars: the keys the CSV, TensorBoard and W&B sinks write.

Pairs are named by their two task names, sorted and joined by ``-`` (``cos/depth-seg``), so the key of a pair
never depends on the order of the losses dict. The keys:

- ``conflict_fraction``, ``cancellation``, ``update_norm``, ``worst_cosine``, ``condition_number``;
- ``cos/<a>-<b>`` for each pair;
- ``norm/<task>``, ``alignment/<task>``, ``loss/<task>``, ``weight/<task>`` for each task;
- with ``layers=True``, for each shared layer ``<name>``: ``layer/<name>/conflict_fraction``,
  ``layer/<name>/worst_cosine`` and ``layer/<name>/cos/<a>-<b>``.

A value that is not finite is left out rather than written as NaN: a step that carried a single task has no pair
(no conflict fraction, cancellation, cosine or alignment: as in the diagnosis, these are only defined on steps
that carried two tasks or more), and linearly dependent gradients have an infinite condition number. A skipped
step has only its weights and losses.

>>> import torch
>>> from gradconflict import ConflictReport
>>> r = ConflictReport(("seg", "depth"), torch.tensor([[4.0, -2.0], [-2.0, 9.0]]), losses=torch.tensor([0.5, 2.0]))
>>> s = scalars(r)
>>> round(s["cos/depth-seg"], 4), s["norm/depth"], s["conflict_fraction"], s["loss/seg"]
(-0.3333, 3.0, 1.0, 0.5)
"""

from __future__ import annotations

import math

import torch

from gradconflict import metrics
from gradconflict.report import ConflictReport

__all__ = ["pair_key", "scalars"]


def pair_key(a: str, b: str) -> str:
    """The name of the pair of tasks ``a`` and ``b`` in the keys: the two names sorted, joined by ``-``.

    >>> pair_key("seg", "depth")
    'depth-seg'
    """
    return "-".join(sorted((a, b)))


def scalars(report: ConflictReport, *, layers: bool = False) -> dict[str, float]:
    """The step's quantities as ``{key: float}`` (see the module docstring for the keys); ``layers=True`` adds
    each shared layer's conflict fraction, worst cosine and pair cosines (computed for all layers at once)."""
    tasks = report.tasks
    out: dict[str, float] = {f"weight/{t}": v for t, v in zip(tasks, report.weights.tolist())}
    if report.losses is not None:
        out.update({f"loss/{t}": v for t, v in zip(tasks, report.losses.tolist())})
    if not report.skipped:
        T = len(tasks)
        i, j = torch.triu_indices(T, T, 1).tolist()
        pairs = [pair_key(tasks[a], tasks[b]) for a, b in zip(i, j)]
        out.update(update_norm=float(report.update_norm), condition_number=float(report.condition_number))
        out.update({f"norm/{t}": v for t, v in zip(tasks, report.task_norms.tolist())})
        if pairs:  # the pair quantities: only defined on a step that carried two tasks or more
            C = report.cosine[i, j]
            out.update(
                conflict_fraction=float(report.conflict_fraction),
                cancellation=float(report.cancellation),
                worst_cosine=float(C.min()),
            )
            out.update({f"cos/{p}": v for p, v in zip(pairs, C.tolist())})
            out.update({f"alignment/{t}": v for t, v in zip(tasks, report.alignment.tolist())})
            if layers and report.layers:
                out.update(_layer_scalars(report, pairs, i, j))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _layer_scalars(report: ConflictReport, pairs: list[str], i: list[int], j: list[int]) -> dict[str, float]:
    names = list(report.layers)
    G = torch.stack([report.layers[n].gram.double() for n in names])  # [L, T, T]: every layer in one batch
    C = metrics.cosine(G)[:, i, j]
    fraction = metrics.conflict_fraction(G, report.threshold).tolist()
    worst = C.amin(1).tolist()
    out: dict[str, float] = {}
    for name, f, w, row in zip(names, fraction, worst, C.tolist()):
        out[f"layer/{name}/conflict_fraction"] = f
        out[f"layer/{name}/worst_cosine"] = w
        out.update({f"layer/{name}/cos/{p}": v for p, v in zip(pairs, row)})
    return out
