"""How a :class:`~gradconflict.records.history.History` stores its steps on the host (private to
:mod:`gradconflict.records`): each step's numbers packed in one float row (weights ``[T]``, losses ``[T]``, then the
Gram and each layer's Gram ``[T, T]``, flattened), what a run's steps share kept once (:class:`Layout`), and the
kept steps as segments of rows of a few blocks (:class:`Segment`), never an object per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradconflict.measure.report import ConflictReport, LayerReport


# The layout of a packed row (one definition, read by the segments, the folds and the stacked views): weights [T],
# losses [T], then the Gram and each layer's Gram [T, T], flattened. Each works on one row [K] or on stacked rows
# [N, K].
def row_weights(packed: Tensor, T: int) -> Tensor:
    return packed[..., :T]


def row_losses(packed: Tensor, T: int) -> Tensor:
    return packed[..., T : 2 * T]


def row_grams(packed: Tensor, T: int) -> Tensor:
    """``[..., 1 + L, T, T]``: the Gram, then each layer's."""
    return packed[..., 2 * T :].reshape(*packed.shape[:-1], -1, T, T)


@dataclass(frozen=True)
class Layout:
    """What a run's steps share, kept once: the tasks, the layers, how the step was measured."""

    tasks: tuple[str, ...]
    layers: tuple[tuple[str, int, str], ...]  # (name, shared parameter entries, route)
    engine: str
    strategy: str
    approximate: bool
    threshold: float
    has_losses: bool
    sync: str = ""


#: The skip reason of a step whose Gram is not finite.
NONFINITE = "non-finite gradients"


def step_report(layout: Layout, step: int, skip_reason: str, packed: Tensor) -> ConflictReport:
    """The report of one kept step: its layout and its packed row ``[K]``."""
    T = len(layout.tasks)
    weights, losses = row_weights(packed, T), row_losses(packed, T)
    if skip_reason:
        return ConflictReport.skipped_step(
            layout.tasks, step, skip_reason, losses if layout.has_losses else None, layout.engine, weights
        )
    grams = row_grams(packed, T)
    layers = {
        name: LayerReport(name, layout.tasks, grams[k + 1], weights, num_params=n, route=route,
                          threshold=layout.threshold)
        for k, (name, n, route) in enumerate(layout.layers)
    }
    return ConflictReport(
        layout.tasks,
        grams[0],
        weights,
        losses=losses if layout.has_losses else None,
        layers=layers,
        step=step,
        engine=layout.engine,
        strategy=layout.strategy,
        approximate=layout.approximate,
        threshold=layout.threshold,
        sync=layout.sync,
    )


class Kept(NamedTuple):
    """One kept step, as stored (what :meth:`History._kept` yields)."""

    layout: Layout
    step: int
    skip_reason: str
    packed: Tensor  # [K] the step's packed row


@dataclass(slots=True)
class Segment:
    """Kept steps of one layout: rows ``start:stop`` of one block of packed rows (``[N, K]``), ``steps[k]`` the
    step of row ``k``. A million steps read from a file are a few such segments (columns, not an object per
    step); an appended step is a segment of one row. Dropping the oldest steps moves ``start``."""

    layout: Layout
    steps: np.ndarray  # [N] int64
    block: Tensor
    skipped: dict[int, str]  # row -> skip reason, for the rows that were not measured (usually none)
    start: int
    stop: int

    @classmethod
    def one(cls, layout: Layout, step: int, skip_reason: str, packed: Tensor) -> Segment:
        """A segment of one step (its packed row ``[K]``)."""
        skipped = {0: skip_reason} if skip_reason else {}
        return cls(layout, np.array([step], dtype=np.int64), packed[None], skipped, 0, 1)

    def __len__(self) -> int:
        return self.stop - self.start

    def at(self, row: int) -> Kept:
        """The step of block row ``row``."""
        return Kept(self.layout, int(self.steps[row]), self.skipped.get(row, ""), self.block[row])

    def kept(self) -> Iterator[Kept]:
        return map(self.at, range(self.start, self.stop))

    def measured(self) -> tuple[np.ndarray, Tensor]:
        """``(steps [n], packed rows [n, K])`` of the measured rows: views when no row here was skipped."""
        start, stop = self.start, self.stop
        if not any(start <= row < stop for row in self.skipped):
            return self.steps[start:stop], self.block[start:stop]
        rows = np.array([row for row in range(start, stop) if row not in self.skipped], dtype=np.int64)
        return self.steps[rows], self.block[torch.from_numpy(rows)]


def cat_rows(pieces: list[Tensor]) -> Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
