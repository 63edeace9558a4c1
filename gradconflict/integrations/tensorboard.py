"""The TensorBoard sink: each step's scalars through ``SummaryWriter.add_scalar``, and a cosine heat-map image
every so many steps.

Tags are ``<prefix>/<key>`` with the keys of :func:`~gradconflict.records.sinks.scalars.scalars`:
``conflict/cos/<a>-<b>``, ``conflict/cancellation``, ``conflict/conflict_fraction``, ``conflict/norm/<task>``,
``conflict/layer/<name>/worst_cosine``, ... and the image ``conflict/cosine``. The global step is the report's
``step`` (the monitor's count of ``backward``/``measure`` calls, i.e. the training step when it is called once
a step). Needs ``tensorboard`` (``pip install "gradconflict[tensorboard]"``) and, for the images, matplotlib.

>>> import tempfile, torch
>>> from gradconflict import ConflictReport
>>> sink = TensorBoardSink(tempfile.mkdtemp(), image_every=None)
>>> sink.write(ConflictReport("ab", torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), step=0))
>>> sink.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradconflict.integrations.images import CosineImages
from gradconflict.measure.report import ConflictReport
from gradconflict.records.sinks.scalars import scalars

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Logs each step to TensorBoard.

    Args:
        log_dir: the folder of a new ``SummaryWriter`` (ignored when ``writer`` is given).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` your loop already logs to; it is flushed, not
            closed, by :meth:`close` (the writer this sink makes itself is closed).
        prefix: the first part of every tag.
        layers: also log each shared layer's conflict fraction, worst cosine and pair cosines.
        image_every: log the cosine heat-map image once every this many training steps (``None``: never).

    >>> import tempfile
    >>> TensorBoardSink(tempfile.mkdtemp(), layers=False).layers
    False
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        writer: Any = None,
        prefix: str = "conflict",
        layers: bool = True,
        image_every: int | None = 100,
    ) -> None:
        self._images = CosineImages(image_every)
        self._owned = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    'TensorBoardSink needs tensorboard: pip install "gradconflict[tensorboard]"'
                ) from err
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer
        self.prefix = prefix
        self.layers = layers

    def write(self, report: ConflictReport) -> None:
        """Log one step's scalars (and the heat-map image when one is due)."""
        for key, value in scalars(report, layers=self.layers).items():
            self.writer.add_scalar(f"{self.prefix}/{key}", value, report.step)
        if self._images.due(report):
            self.writer.add_image(f"{self.prefix}/cosine", self._images.image(report), report.step, dataformats="HWC")

    def close(self) -> None:
        """Flush, and close the writer if this sink made it."""
        self.writer.flush()
        if self._owned:
            self.writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink({getattr(self.writer, 'log_dir', self.writer)!r})"
