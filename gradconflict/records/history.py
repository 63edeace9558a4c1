# One file of ~680 lines on purpose: the History is one class whose appending, folding, reading and state share
# its segments and moving averages (the storage format itself is in _steps.py).
"""The run's memory: each measured (or skipped) step's report, kept on the host in compact form, with moving
averages folded in as steps arrive.

A report arrives holding tensors on the model's device. :meth:`History.append` packs its numbers (weights,
losses, the Gram and every layer's Gram) into one flat tensor and copies it to the host; on a GPU the copy is
asynchronous and is collected once it has landed, so appending never waits for the device. Each collected step
is handed to the sinks (a :class:`~gradconflict.records.sinks.JSONLSink` writes it to disk at once) and kept, up to
``max_history`` steps (the oldest are dropped; the averages and the sinks cover the whole run); the moving
averages fold the collected steps in batches of :data:`FOLD_BATCH` (and whenever they are read), which costs a
few microseconds a step. A step whose Gram is not finite is kept as skipped and never enters the averages.

Tasks are tracked by name: steps may carry different tasks, in any order. Reading ``history[k]`` gives a
:class:`~gradconflict.ConflictReport` with CPU tensors; :meth:`History.stacked` gives the kept steps as stacked
tensors, one block per layout, without building a report per step.

Besides the moving averages of :data:`EMA_QUANTITIES`, the history keeps GradVac's cosine EMA of every task pair,
over the whole shared backbone (:attr:`History.gradvac`) and per layer (:attr:`History.gradvac_layers`). Pairs are
named by :func:`~gradconflict.records.pairs.pair_key` (``"cosine/a/b"``), as in the sinks and the diagnosis.

>>> import torch
>>> from gradconflict import ConflictReport
>>> h = History(ema_decay=0.5)
>>> for s, c in enumerate([1.0, -1.0]):
...     h.append(ConflictReport(("a", "b"), torch.tensor([[1.0, c], [c, 1.0]]), step=s))
>>> len(h), h.ema["conflict_fraction"], h.ema["cosine/a/b"]
(2, 0.5, 0.0)
"""

from __future__ import annotations

import json
import math
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from gradconflict.measure import metrics
from gradconflict.measure.attribution import SampleAttribution
from gradconflict.measure.report import ConflictReport
from gradconflict.records._steps import (
    NONFINITE,
    Kept,
    Layout,
    Segment,
    cat_rows,
    row_grams,
    row_losses,
    row_weights,
    step_report,
)
from gradconflict.records.layers import merge_orders
from gradconflict.records.pairs import pair_key
from gradconflict.records.samples import SampleTally

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["EMA_DECAY", "EMA_QUANTITIES", "GRADVAC_BETA", "MAX_HISTORY", "History", "Sink", "Stacked", "worst_cosine"]

#: Version of the compact state (:meth:`History.state_dict`).
SCHEMA = 1

#: Version of each line a JSONL history holds. 2: a line lists its layers bottom to top, in the model's order; a
#: line of schema 1 listed them as the backward reached them, and is read in natural order of the names
#: (:mod:`~gradconflict.records.layers`).
LINE_SCHEMA = 2

#: The default weight of the past in every exponential moving average of a run, per measured step (the history's,
#: the monitor's and the diagnosis' trends).
EMA_DECAY = 0.9

#: GradVac's EMA rate ``beta`` by default: the value of the paper (Wang et al., ICLR 2021).
GRADVAC_BETA = 0.01

#: Steps a history keeps by default (the oldest are dropped; the averages and the sinks cover the whole run).
MAX_HISTORY = 10_000

#: The run-level quantities whose exponential moving average is kept (besides each pair's ``cosine/<pair key>``).
EMA_QUANTITIES = ("conflict_fraction", "cancellation", "worst_cosine", "update_norm")

#: Steps folded into the moving averages at once (their quantities are computed as one batch).
FOLD_BATCH = 64

#: Steps folded at once while a saved history is read (larger batches: fewer, bigger tensor operations; the
#: averages agree with those of appending to rounding).
READ_FOLD_BATCH = 8192


class Sink(Protocol):
    """Where measured steps go as they are collected (see :mod:`gradconflict.records.sinks`)."""

    def write(self, report: ConflictReport) -> None:
        """Record one step (a host-side report)."""

    def close(self) -> None:
        """Flush and release."""


def worst_cosine(report: ConflictReport) -> Tensor:
    """The most negative pairwise cosine of a report (:func:`gradconflict.measure.metrics.worst_cosine`; NaN when
    there is a single task: no pair)."""
    return metrics.worst_cosine(report.gram)


class Stacked(NamedTuple):
    """The kept measured steps that share one layout, stacked (what :meth:`History.stacked` returns).

    Attributes:
        tasks: the task names, in the order of every T-sized axis.
        layers: ``(layer name, shared parameter entries)`` of each layer, in order.
        threshold: the conflict cosine ``S`` the steps were measured with.
        has_losses: whether the steps recorded their losses (NaN otherwise).
        steps: ``[N]`` training step of each row.
        packed: ``[N, 2 T + (L + 1) T T]``, the storage the typed views below read (each row: weights, losses,
            the Gram and each layer's Gram, flattened, in the Grams' own precision); read the views, not this.

    The typed views (no copy): :attr:`weights` ``[N, T]``, :attr:`losses` ``[N, T]`` (``None`` when not recorded),
    :attr:`gram` ``[N, T, T]`` and :attr:`layer_gram` ``[N, L, T, T]``.

    >>> import torch
    >>> from gradconflict import ConflictReport
    >>> h = History()
    >>> h.append(ConflictReport("ab", torch.tensor([[1.0, -0.5], [-0.5, 4.0]]), losses=torch.tensor([2.0, 3.0])))
    >>> (block,) = h.stacked()
    >>> block.gram[0].tolist(), block.losses.tolist(), block.layer_gram.shape
    ([[1.0, -0.5], [-0.5, 4.0]], [[2.0, 3.0]], torch.Size([1, 0, 2, 2]))
    """

    tasks: tuple[str, ...]
    layers: tuple[tuple[str, int], ...]
    threshold: float
    has_losses: bool
    steps: Tensor
    packed: Tensor

    @property
    def weights(self) -> Tensor:
        """``[N, T]`` the task weights of each step's update."""
        return row_weights(self.packed, len(self.tasks))

    @property
    def losses(self) -> Tensor | None:
        """``[N, T]`` the task losses of each step, ``None`` when the steps did not record them."""
        return row_losses(self.packed, len(self.tasks)) if self.has_losses else None

    @property
    def gram(self) -> Tensor:
        """``[N, T, T]`` the Gram of each step over the whole shared backbone."""
        return row_grams(self.packed, len(self.tasks))[..., 0, :, :]

    @property
    def layer_gram(self) -> Tensor:
        """``[N, L, T, T]`` each layer's Gram, in the order of :attr:`layers`."""
        return row_grams(self.packed, len(self.tasks))[..., 1:, :, :]


@dataclass
class _Pending:
    """An appended step whose numbers are on their way to the host."""

    layout: Layout
    step: int
    skip_reason: str
    packed: Tensor  # [K]
    samples: SampleAttribution | None  # on the host, until the sinks have written it
    event: Any  # a CUDA event marking the end of the copy, or None when the row is already on the host


class History:
    """Every measured step's report, in order (the last ``max_history``), with moving averages of the whole run.

    Args:
        ema_decay: weight of the past in each EMA (``ema = decay * ema + (1 - decay) * value``), per measured step.
        max_history: keep at most this many steps (the oldest are dropped); ``None`` keeps all.
        sinks: objects with ``write(report)`` and ``close()`` that receive each step as it is collected.
        gradvac_beta: GradVac's EMA rate ``beta`` (weight of the new cosine), for :attr:`gradvac`; the paper uses
            0.01.
    """

    def __init__(
        self,
        ema_decay: float = EMA_DECAY,
        max_history: int | None = MAX_HISTORY,
        sinks: Iterable[Sink] = (),
        gradvac_beta: float = GRADVAC_BETA,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 < gradvac_beta <= 1.0:
            raise ValueError(f"gradvac_beta must be in (0, 1], got {gradvac_beta}")
        if max_history is not None and (not isinstance(max_history, int) or max_history < 1):
            raise ValueError(f"max_history must be a positive integer or None, got {max_history!r}")
        self.ema_decay = ema_decay
        self.max_history = max_history
        self.sinks = list(sinks)
        self._segments: deque[Segment] = deque()
        self._kept_count = 0  # steps in the segments
        self._pending: deque[_Pending] = deque()
        self._layouts: dict[Layout, Layout] = {}
        self._unfolded: list[tuple[Layout, Tensor]] = []  # measured rows admitted, not yet in the moving averages
        self._unfolded_count = 0
        self._ema: dict[str, float] = {}
        self.gradvac_beta = gradvac_beta
        self._gradvac: dict[str, dict[str, float]] = {}  # "" (the whole backbone) or a layer -> pair -> phi
        self.steps_seen = 0
        #: per-id aggregates of the steps measured with ``sample_ids`` (the whole run, not only the kept steps)
        self.samples = SampleTally()

    # ------------------------------------------------------------------------------------------ appending
    def append(self, report: ConflictReport) -> None:
        """Add one step's report. Nothing waits for the device: on a GPU the numbers are copied asynchronously
        and folded in once they have landed (at the latest when the history is next read)."""
        T = len(report.tasks)
        # A skipped step has no Gram; its few numbers are copied as they are (it was decided on the host anyway).
        device = torch.device("cpu") if report.skipped else report.gram.device
        dtype = torch.float64 if report.skipped else report.gram.dtype
        parts = [report.weights.detach().to(device=device, dtype=dtype).reshape(T)]
        losses = report.losses
        parts.append(
            losses.detach().to(device=device, dtype=dtype).reshape(T)
            if losses is not None
            else torch.full((T,), math.nan, dtype=dtype, device=device)
        )
        names = tuple(report.layers)
        if not report.skipped:
            parts.append(report.gram.detach().reshape(-1))
            parts += [report.layers[n].gram.detach().to(dtype).reshape(-1) for n in names]
        layout = Layout(
            tuple(report.tasks),
            tuple((n, report.layers[n].num_params, report.layers[n].route) for n in names),
            report.engine,
            report.strategy,
            report.approximate,
            report.threshold,
            losses is not None,
            report.sync,
        )
        layout = self._layouts.setdefault(layout, layout)
        packed = torch.cat(parts)
        event = None
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            packed = host
        else:
            packed = packed.cpu()
        samples = None
        if report.samples is not None:  # attributed steps copy to the host at once (the tally reads them)
            samples = report.samples.to("cpu")
            self.samples.add(samples)
        self._pending.append(_Pending(layout, report.step, report.skip_reason, packed, samples, event))
        self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        """Admit the steps whose copy has landed (all of them when ``wait``), and fold the moving averages once
        a batch of steps is waiting (all of them when ``wait``)."""
        while self._pending:
            pending = self._pending[0]
            if pending.event is not None:
                if not wait and not pending.event.query():
                    break
                pending.event.synchronize()
            self._pending.popleft()
            self._admit(pending)
        if self._unfolded and (wait or self._unfolded_count >= FOLD_BATCH):
            self._fold()

    def _admit(self, pending: _Pending) -> None:
        layout, T, reason = pending.layout, len(pending.layout.tasks), pending.skip_reason
        if not reason and not bool(torch.isfinite(row_grams(pending.packed, T)).all()):
            reason = NONFINITE
        self.steps_seen += 1
        self._keep(Segment.one(layout, pending.step, reason, pending.packed))
        if not self.sinks:
            return
        report = step_report(layout, pending.step, reason, pending.packed)  # one host-side report for every sink
        report.samples = pending.samples
        for sink in list(self.sinks):
            try:
                sink.write(report)
            except Exception as err:  # a failing sink must never stop training
                self.sinks.remove(sink)
                warnings.warn(f"gradconflict: sink {sink!r} failed and is dropped: {err}", RuntimeWarning, stacklevel=4)

    def _keep(self, segment: Segment) -> None:
        """Store an admitted segment (dropping the oldest steps beyond ``max_history``) and queue its measured rows
        for the moving averages."""
        _, rows = segment.measured()
        if len(rows):
            self._unfolded.append((segment.layout, rows))
            self._unfolded_count += len(rows)
        self._segments.append(segment)
        self._kept_count += len(segment)
        excess = self._kept_count - self.max_history if self.max_history is not None else 0
        while excess > 0:
            first = self._segments[0]
            dropped = min(excess, len(first))
            if dropped == len(first):
                self._segments.popleft()
            else:
                first.start += dropped
            self._kept_count -= dropped
            excess -= dropped

    def _kept(self) -> Iterator[Kept]:
        """Every kept step, oldest first."""
        for segment in self._segments:
            yield from segment.kept()

    def _fold(self) -> None:
        """Fold the waiting steps into the moving averages, in step order, computing their quantities for each
        run of steps that share a layout at once (in batches of at most :data:`READ_FOLD_BATCH`)."""
        waiting, self._unfolded, self._unfolded_count = self._unfolded, [], 0
        start = 0
        while start < len(waiting):
            layout = waiting[start][0]
            stop = start
            while stop < len(waiting) and waiting[stop][0] is layout:
                stop += 1
            packed = cat_rows([rows for _, rows in waiting[start:stop]])
            for first in range(0, len(packed), READ_FOLD_BATCH):
                self._fold_run(layout, packed[first : first + READ_FOLD_BATCH])
            start = stop

    def _fold_run(self, layout: Layout, packed: Tensor) -> None:
        T = len(layout.tasks)
        packed = packed.double()
        w, grams = row_weights(packed, T), row_grams(packed, T)  # the Gram, then each layer's
        G = grams[:, 0]
        columns: dict[str, list[float]] = {
            "cancellation": metrics.cancellation(G, w).tolist(),
            "update_norm": metrics.update_norm(G, w).tolist(),
        }
        if T > 1:  # pair quantities only exist with two tasks or more
            i, j = torch.triu_indices(T, T, 1)
            cosines = metrics.cosine(grams)[:, :, i, j]  # [N, 1 + L, pairs]: the whole backbone, then each layer
            pairs = cosines[:, 0]
            columns["conflict_fraction"] = metrics.conflict_fraction(G, layout.threshold).tolist()
            columns["worst_cosine"] = metrics.worst_cosine(G).tolist()
            names = [pair_key(layout.tasks[a], layout.tasks[b]) for a, b in zip(i.tolist(), j.tolist())]
            for k, name in enumerate(names):
                columns["cosine/" + name] = pairs[:, k].tolist()
            self._fold_gradvac(layout, names, cosines)
        d = self.ema_decay
        for key, values in columns.items():
            ema = self._ema.get(key)
            for value in values:
                ema = value if ema is None else d * ema + (1 - d) * value
            self._ema[key] = ema  # type: ignore[assignment]

    def _fold_gradvac(self, layout: Layout, pairs: list[str], cosines: Tensor) -> None:
        """GradVac's EMA (Wang et al., ICLR 2021, Sec. 3.2, Eq. 3): ``phi <- (1 - beta) phi + beta cos``, from 0.

        ``cosines`` is ``[N, 1 + L, P]`` (the whole backbone, then each layer). Folding ``N`` steps at once:
        ``phi_N = (1 - beta)^N phi_0 + sum_k beta (1 - beta)^(N - 1 - k) cos_k``.
        """
        beta, N = self.gradvac_beta, cosines.shape[0]
        weights = beta * (1 - beta) ** torch.arange(N - 1, -1, -1, dtype=cosines.dtype)
        folded = torch.einsum("n,nlp->lp", weights, cosines).tolist()
        for where, row in zip(["", *(name for name, _, _ in layout.layers)], folded):
            phi = self._gradvac.setdefault(where, {})
            for pair, value in zip(pairs, row):
                phi[pair] = (1 - beta) ** N * phi.get(pair, 0.0) + value

    # ------------------------------------------------------------------------------------------ reading
    @property
    def gradvac(self) -> dict[str, float]:
        """GradVac's EMA of each task pair's cosine over the whole shared backbone, ``{pair_key(a, b): phi}``:
        ``phi_ij <- (1 - beta) phi_ij + beta cos(g_i, g_j)`` on every measured step that carried both tasks,
        starting from ``phi_ij = 0`` (Wang et al., "Gradient Vaccine", ICLR 2021, Sec. 3.2, Eq. 3; ``beta`` is
        ``gradvac_beta``). The cosines are those of the gradients as trained; GradVac itself measures them
        after adjusting ``g_i``, so under GradVac training the two differ."""
        self._collect(wait=True)
        return dict(self._gradvac.get("", {}))

    @property
    def gradvac_layers(self) -> dict[str, dict[str, float]]:
        """GradVac's EMA per layer (its per-layer granularity): ``{layer: {pair_key(a, b): phi}}``, as :attr:`gradvac`
        over each layer's parameters."""
        self._collect(wait=True)
        return {k: dict(v) for k, v in self._gradvac.items() if k}

    def stacked(self) -> list[Stacked]:
        """The kept measured (not skipped) steps, one :class:`Stacked` block per layout (tasks in the same order,
        the same layers), each in step order: the records as stored, without building a report per step."""
        self._collect(wait=True)
        blocks: dict[Layout, list[tuple[np.ndarray, Tensor]]] = {}
        for segment in self._segments:
            steps, rows = segment.measured()
            if len(steps):
                blocks.setdefault(segment.layout, []).append((steps, rows))
        return [
            Stacked(
                lay.tasks, tuple((name, n) for name, n, _ in lay.layers), lay.threshold, lay.has_losses,
                torch.from_numpy(np.concatenate([steps for steps, _ in pieces])),
                cat_rows([rows for _, rows in pieces]),
            )
            for lay, pieces in blocks.items()
        ]

    @property
    def ema(self) -> dict[str, float]:
        """Exponential moving averages over every measured step so far: each of :data:`EMA_QUANTITIES` and each
        task pair's cosine (``"cosine/" + pair_key(a, b)``, e.g. ``"cosine/a/b"``), over the steps that carried that
        pair."""
        self._collect(wait=True)
        return dict(self._ema)

    @property
    def reports(self) -> list[ConflictReport]:
        """The kept steps' reports (CPU tensors), oldest first."""
        self._collect(wait=True)
        return [step_report(*kept) for kept in self._kept()]

    @property
    def measured(self) -> list[ConflictReport]:
        """The reports of the kept steps that were measured (not skipped)."""
        return [r for r in self.reports if not r.skipped]

    def skipped_steps(self) -> list[tuple[int, str]]:
        """``(step, reason)`` of each kept step that was skipped, oldest first, without building a report.

        >>> import torch
        >>> from gradconflict import ConflictReport
        >>> h = History()
        >>> h.append(ConflictReport.skipped_step(("a", "b"), 3, "non-finite loss"))
        >>> h.skipped_steps()
        [(3, 'non-finite loss')]
        """
        self._collect(wait=True)
        return [
            (int(segment.steps[row]), reason)
            for segment in self._segments
            for row, reason in sorted(segment.skipped.items())
            if segment.start <= row < segment.stop
        ]

    @property
    def tasks(self) -> list[str]:
        """Every task name met in the kept steps, in order of first appearance."""
        self._collect(wait=True)
        return list(dict.fromkeys(t for segment in self._segments for t in segment.layout.tasks))

    @property
    def layer_order(self) -> list[str]:
        """Every layer met in the kept steps, bottom to top: the order of the reports' ``layers`` (the model's,
        under a monitor; a saved run keeps it), merged over the steps'
        (:func:`~gradconflict.records.layers.merge_orders`). What the diagnosis and the reports follow without a
        model.

        >>> import torch
        >>> from gradconflict import ConflictReport, LayerReport
        >>> h = History()
        >>> layers = {n: LayerReport(n, "ab", torch.eye(2)) for n in ("stem", "body", "neck")}
        >>> h.append(ConflictReport("ab", 3 * torch.eye(2), layers=layers))
        >>> h.layer_order
        ['stem', 'body', 'neck']
        """
        self._collect(wait=True)
        layouts = dict.fromkeys(segment.layout for segment in self._segments)
        return merge_orders([name for name, _, _ in lay.layers] for lay in layouts)

    def __len__(self) -> int:
        self._collect(wait=True)
        return self._kept_count

    def __iter__(self) -> Iterator[ConflictReport]:
        return iter(self.reports)

    def __getitem__(self, index: int) -> ConflictReport:
        self._collect(wait=True)
        if not -self._kept_count <= index < self._kept_count:
            raise IndexError(f"history index {index} out of range ({self._kept_count} steps kept)")
        index %= self._kept_count
        for segment in self._segments:
            if index < len(segment):
                return step_report(*segment.at(segment.start + index))
            index -= len(segment)
        raise AssertionError("unreachable: the segments hold _kept_count steps")

    def reset(self) -> None:
        """Forget every step and moving average."""
        self._collect(wait=True)
        self._segments.clear()
        self._kept_count = 0
        self._ema.clear()
        self._gradvac.clear()
        self._unfolded.clear()
        self._unfolded_count = 0
        self.steps_seen = 0

    def close(self) -> None:
        """Collect what is pending and close the sinks."""
        self._collect(wait=True)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # closing must not fail the run either
                warnings.warn(f"gradconflict: sink {sink!r} failed to close: {err}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------ exporting
    def rows(self) -> list[dict[str, Any]]:
        """One flat row per step: step, skipped, losses, the scalar metrics, and each pair's cosine."""
        rows = []
        for r in self.reports:
            row: dict[str, Any] = {"step": r.step, "skipped": r.skipped}
            if r.losses is not None:
                row.update({f"loss/{t}": float(v) for t, v in zip(r.tasks, r.losses.tolist())})
            if not r.skipped:
                row.update(
                    conflict_fraction=float(r.conflict_fraction),
                    cancellation=float(r.cancellation),
                    update_norm=float(r.update_norm),
                    worst_cosine=float(worst_cosine(r)),
                    condition_number=float(r.condition_number),
                )
                row.update({f"alignment/{t}": v for t, v in zip(r.tasks, r.alignment.tolist())})
                C = r.cosine.tolist()
                for i, a in enumerate(r.tasks):
                    for j in range(i + 1, len(r.tasks)):
                        row["cosine/" + pair_key(a, r.tasks[j])] = C[i][j]
            rows.append(row)
        return rows

    def to_dataframe(self) -> pd.DataFrame:
        """The :meth:`rows` as a pandas DataFrame indexed by step (needs ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("History.to_dataframe() needs pandas: pip install 'gradconflict[pandas]'") from err
        return pd.DataFrame(self.rows()).set_index("step")

    def to_jsonl(self, path: str | Path, *, packed: bool = True) -> Path:
        """Write one JSON line per kept step (``ConflictReport.to_dict()``, layers included), as a
        :class:`~gradconflict.records.sinks.JSONLSink` writes them (with its packed file beside, unless
        ``packed=False``); returns the path."""
        from gradconflict.records.sinks.jsonl import JSONLSink  # the sink modules import this one
        from gradconflict.records.sinks.packed import packed_path

        path = Path(path)
        reports = self.reports
        if not reports:  # the sink opens its files at the first step: an empty history writes them here
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
            packed_path(path).unlink(missing_ok=True)
        sink = JSONLSink(path, overwrite=True, packed=packed)
        try:
            for report in reports:
                sink.write(report)
        finally:
            sink.close()
        return path

    @classmethod
    def from_jsonl(cls, path: str | Path, ema_decay: float = EMA_DECAY, max_history: int | None = None) -> History:
        """Read a history written by :meth:`to_jsonl` or a :class:`~gradconflict.records.sinks.JSONLSink` (the EMAs are
        recomputed): every step of the file by default (``max_history=None``), the last ``max_history`` otherwise
        (the EMAs and :attr:`steps_seen` cover the whole file either way). A line that is not JSON (cut short by a
        crash) is skipped with a ``RuntimeWarning`` naming its line number; a JSON line that is not a history step
        is a ``ValueError`` naming the line and the field. The file is read in blocks of steps straight into the
        packed storage (:func:`~gradconflict.records.sinks.jsonl.read_blocks`: from the packed file a
        :class:`~gradconflict.records.sinks.JSONLSink` writes beside it where that holds, else from the JSON),
        without a report per line; the history is the one appending each line's :meth:`ConflictReport.from_dict`
        would give (its moving averages folded in larger batches, so equal to rounding). The same pass fills
        :attr:`samples` from the steps a ``JSONLSink`` wrote with their per-example attribution (``sample_ids``)."""
        from gradconflict.records.sinks.jsonl import read_blocks  # the sink module imports this one

        history = cls(ema_decay=ema_decay, max_history=max_history)
        for layout, steps, reason, packed in read_blocks(path, samples=history.samples):
            history._admit_block(history._layouts.setdefault(layout, layout), steps, reason, packed)
        history._collect(wait=True)
        return history

    def _admit_block(self, layout: Layout, steps: Sequence[int], reason: str, packed: Tensor) -> None:
        """Admit host rows of one layout (``packed[k]`` the packed row of ``steps[k]``) as :meth:`_admit` admits
        each (a row whose Gram is not finite is kept as skipped), with one finiteness check for the block. For a
        history without sinks (:meth:`from_jsonl`'s): the rows are stored, not handed to sinks."""
        T = len(layout.tasks)
        if reason:
            skipped = dict.fromkeys(range(len(steps)), reason)
        else:  # numpy's isfinite: torch's makes a float temporary the size of the block (|x| != inf)
            finite = np.isfinite(packed[:, 2 * T :].numpy()).all(1)
            skipped = dict.fromkeys(np.flatnonzero(~finite).tolist(), NONFINITE)
        self._keep(Segment(layout, np.asarray(steps, dtype=np.int64), packed, skipped, 0, len(steps)))
        self.steps_seen += len(steps)
        if self._unfolded_count >= READ_FOLD_BATCH:
            self._fold()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the kept steps (compact), the moving averages and the settings."""
        self._collect(wait=True)
        layouts = list(dict.fromkeys(segment.layout for segment in self._segments))
        index = {lay: k for k, lay in enumerate(layouts)}
        return {
            "schema": SCHEMA,
            "ema_decay": self.ema_decay,
            "max_history": self.max_history,
            "steps_seen": self.steps_seen,
            "ema": dict(self._ema),
            "gradvac_beta": self.gradvac_beta,
            "gradvac": {k: dict(v) for k, v in self._gradvac.items()},
            "samples": self.samples.state_dict(),
            "layouts": [
                {
                    "tasks": list(lay.tasks),
                    "layers": [list(x) for x in lay.layers],
                    "engine": lay.engine,
                    "strategy": lay.strategy,
                    "approximate": lay.approximate,
                    "threshold": lay.threshold,
                    "has_losses": lay.has_losses,
                    "sync": lay.sync,
                }
                for lay in layouts
            ],
            "records": [(index[k.layout], k.step, k.skip_reason, k.packed) for k in self._kept()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the sinks are kept; they are not replayed)."""
        if state.get("schema") != SCHEMA:
            raise ValueError(f"not a gradconflict History state (schema {state.get('schema')!r}, expected {SCHEMA})")
        self._collect(wait=True)
        self.ema_decay = state["ema_decay"]
        self.max_history = state["max_history"]
        layouts = [
            Layout(
                tuple(d["tasks"]),
                tuple((str(n), int(k), str(r)) for n, k, r in d["layers"]),
                d["engine"],
                d["strategy"],
                d["approximate"],
                d["threshold"],
                d["has_losses"],
                d.get("sync", ""),
            )
            for d in state["layouts"]
        ]
        self._layouts = {lay: lay for lay in layouts}
        self._segments.clear()
        self._kept_count = 0
        for k, step, reason, packed in state["records"]:
            self._keep(Segment.one(layouts[k], step, reason, packed))
        self._unfolded.clear()  # the moving averages are restored, not refolded
        self._unfolded_count = 0
        self._ema = dict(state["ema"])
        self.gradvac_beta = state.get("gradvac_beta", self.gradvac_beta)
        self._gradvac = {k: dict(v) for k, v in state.get("gradvac", {}).items()}
        self.samples.load_state_dict(state.get("samples", {}))
        self.steps_seen = state["steps_seen"]


def report_record(report: ConflictReport) -> dict[str, Any]:
    """What one line of a JSONL history holds for a report: the schema version, then :meth:`ConflictReport.to_dict`."""
    return {"schema": LINE_SCHEMA, **report.to_dict()}


def json_line(record: dict[str, Any]) -> str:
    """One line of a JSONL history: strict JSON (no NaN), newline-terminated."""
    return json.dumps(record, allow_nan=False) + "\n"


def report_line(report: ConflictReport) -> str:
    """One JSON line for a report, with the schema version (what :meth:`History.to_jsonl` writes)."""
    return json_line(report_record(report))
