"""A step's report, measured or skipped, put together and handed to the history (and through it to the sinks)."""

from __future__ import annotations

from torch import Tensor

from gradconflict.measure.distributed import Sync
from gradconflict.measure.engine import Measurement
from gradconflict.measure.report import ConflictReport, LayerReport
from gradconflict.records.history import History

__all__ = ["Assembler"]


class Assembler:
    """Makes the reports of one monitor: its ``engine`` name, whether that is ``approximate``, the conflict
    ``threshold`` and the ranks' ``sync`` (``None``: one process)."""

    def __init__(
        self, history: History, engine: str, approximate: bool, threshold: float, sync: Sync | None
    ) -> None:
        self.history = history
        self.engine = engine
        self.approximate = approximate
        self.threshold = threshold
        self.sync = sync

    def measured(
        self, names: tuple[str, ...], measurement: Measurement, weights: Tensor, losses: Tensor, step: int
    ) -> ConflictReport:
        """The report of a measured step (not yet recorded). Under a global sync its losses are the ranks' mean,
        so that every rank reports alike."""
        if self.sync is not None and self.sync.is_global:
            losses = self.sync.mean(losses)
        layers = {
            name: LayerReport(
                name, names, entry.gram, weights, num_params=entry.num_params, route=entry.route,
                threshold=self.threshold,
            )
            for name, entry in measurement.layers.items()
        }
        return ConflictReport(
            names,
            measurement.gram,
            weights,
            losses=losses,
            layers=layers,
            step=step,
            engine=self.engine,
            strategy=measurement.strategy,
            # a sketched Gram is an estimate of the exact one, as a representation-mode Gram is
            approximate=self.approximate or (self.sync is not None and self.sync.mode == "sketch"),
            threshold=self.threshold,
            sync="" if self.sync is None else self.sync.mode,
        )

    def skipped(
        self, names: tuple[str, ...], step: int, reason: str, losses: Tensor, weights: Tensor
    ) -> ConflictReport:
        """The report of a step trained without a measurement, recording why."""
        return ConflictReport.skipped_step(names, step, reason, losses, self.engine, weights)

    def record(self, report: ConflictReport) -> ConflictReport:
        """Append ``report`` to the history (and its sinks); returns it."""
        self.history.append(report)
        return report
