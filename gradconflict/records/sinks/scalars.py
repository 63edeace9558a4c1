"""One step's numbers as flat, named scalars: the keys the CSV, TensorBoard and W&B sinks write.

Pairs are named by :func:`~gradconflict.records.pairs.pair_key`: the two task names sorted, escaped, joined by
``/`` (``cos/depth/seg``), as in the history and the diagnosis, so the key of a pair never depends on the order of
the losses dict and two pairs never share one, whatever the task names. The keys:

- ``conflict_fraction``, ``cancellation``, ``update_norm``, ``worst_cosine``, ``condition_number``;
- ``cos/<pair key>`` for each pair;
- ``norm/<task>``, ``alignment/<task>``, ``loss/<task>``, ``weight/<task>`` for each task;
- with ``layers=True``, for each shared layer ``<name>``: ``layer/<name>/conflict_fraction``,
  ``layer/<name>/worst_cosine`` and ``layer/<name>/cos/<pair key>``.

A value that is not finite is left out rather than written as NaN: a step that carried a single task has no pair
(no conflict fraction, cancellation, cosine or alignment: as in the diagnosis, these are only defined on steps
that carried two tasks or more), and linearly dependent gradients have an infinite condition number. A skipped
step has only its weights and losses.

>>> import torch
>>> from gradconflict import ConflictReport
>>> r = ConflictReport(("seg", "depth"), torch.tensor([[4.0, -2.0], [-2.0, 9.0]]), losses=torch.tensor([0.5, 2.0]))
>>> s = scalars(r)
>>> round(s["cos/depth/seg"], 4), s["norm/depth"], s["conflict_fraction"], s["loss/seg"]
(-0.3333, 3.0, 1.0, 0.5)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradconflict.measure import metrics
from gradconflict.measure.report import ConflictReport
from gradconflict.records.pairs import pair_key

__all__ = ["pair_key", "scalars", "tensor_scalars"]


def tensor_scalars(report: ConflictReport, *, layers: bool = False) -> dict[str, Tensor]:
    """The step's quantities as ``{key: 0-dim tensor}``, on the report's device: building them never waits for
    the device (a framework's logger reads them later). Values that are not defined (NaN, inf) are kept; see
    :func:`scalars` for plain, finite numbers."""
    tasks = report.tasks
    out: dict[str, Tensor] = {f"weight/{t}": w for t, w in zip(tasks, report.weights.unbind())}
    if report.losses is not None:
        out.update({f"loss/{t}": v for t, v in zip(tasks, report.losses.unbind())})
    if report.skipped:
        return out
    T = len(tasks)
    i, j = torch.triu_indices(T, T, 1).tolist()
    pairs = [pair_key(tasks[a], tasks[b]) for a, b in zip(i, j)]
    # the same pairs as indices on the report's device: indexing with Python lists would copy them there, waiting
    upper = tuple(torch.triu_indices(T, T, 1, device=report.gram.device))
    out.update(update_norm=report.update_norm, condition_number=report.condition_number)
    out.update({f"norm/{t}": v for t, v in zip(tasks, report.task_norms.unbind())})
    if pairs:  # the pair quantities: only defined on a step that carried two tasks or more
        C = report.cosine[upper]
        out.update(conflict_fraction=report.conflict_fraction, cancellation=report.cancellation)
        out.update(worst_cosine=metrics.worst_cosine(report.gram))
        out.update({f"cos/{p}": v for p, v in zip(pairs, C.unbind())})
        out.update({f"alignment/{t}": v for t, v in zip(tasks, report.alignment.unbind())})
        if layers and report.layers:
            out.update(_layer_scalars(report, pairs, upper))
    return out


def scalars(report: ConflictReport, *, layers: bool = False) -> dict[str, float]:
    """The step's quantities as ``{key: float}`` (see the module docstring for the keys), the finite ones only;
    ``layers=True`` adds each shared layer's conflict fraction, worst cosine and pair cosines (computed for all
    layers at once)."""
    values = tensor_scalars(report, layers=layers)
    if not values:
        return {}
    numbers = torch.stack([v.detach().double().reshape(()).cpu() for v in values.values()]).tolist()
    return {k: v for k, v in zip(values, numbers) if math.isfinite(v)}


def _layer_scalars(report: ConflictReport, pairs: list[str], upper: tuple[Tensor, ...]) -> dict[str, Tensor]:
    names = list(report.layers)
    G = torch.stack([report.layers[n].gram.double() for n in names])  # [L, T, T]: every layer in one batch
    rows, cols = upper
    C = metrics.cosine(G)[:, rows, cols]
    fraction = metrics.conflict_fraction(G, report.threshold)
    worst = metrics.worst_cosine(G)
    out: dict[str, Tensor] = {}
    for k, name in enumerate(names):
        out[f"layer/{name}/conflict_fraction"] = fraction[k]
        out[f"layer/{name}/worst_cosine"] = worst[k]
        out.update({f"layer/{name}/cos/{p}": v for p, v in zip(pairs, C[k].unbind())})
    return out
