"""The Weights & Biases sink: each step's scalars through ``run.log(..., step=)``, and a cosine heat-map image
every so many steps.

Keys are ``<prefix>/<key>`` with the keys of :func:`~gradconflict.records.sinks.scalars.scalars`
(``conflict/cos/<a>-<b>``, ``conflict/cancellation``, ...) and the image ``conflict/cosine``; ``step`` is the
report's ``step`` (the monitor's count of ``backward``/``measure`` calls, i.e. the training step when it is called
once a step). W&B needs the steps of one run to increase: log your own metrics with the same ``step=`` (W&B merges
the keys of one step), or at least before the next training step. Needs ``wandb``
(``pip install "gradconflict[wandb]"``) and, for the images, matplotlib. Offline runs (``WANDB_MODE=offline``)
work the same.

>>> import torch
>>> from gradconflict import ConflictReport
>>> class Run:                                  # anything with W&B's run.log(data, step=) will do
...     def log(self, data, step):
...         print(step, data["conflict/cos/a/b"], data["conflict/cancellation"])
>>> G = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])   # two opposite gradients: cosine -1, everything cancels
>>> WandbSink(Run(), image_every=None).write(ConflictReport("ab", G, step=7))
7 -1.0 1.0
"""

from __future__ import annotations

from typing import Any

from gradconflict.integrations.images import CosineImages
from gradconflict.measure.report import ConflictReport
from gradconflict.records.sinks.scalars import scalars

__all__ = ["WandbSink"]


class WandbSink:
    """Logs each step to a W&B run.

    Args:
        run: the run (what ``wandb.init`` returned); ``None``: the active run, ``wandb.run``. The run stays
            yours: :meth:`close` does not finish it.
        prefix: the first part of every key.
        layers: also log each shared layer's conflict fraction, worst cosine and pair cosines.
        image_every: log the cosine heat-map image once every this many training steps (``None``: never).
    """

    def __init__(
        self, run: Any = None, *, prefix: str = "conflict", layers: bool = False, image_every: int | None = 100
    ) -> None:
        self._images = CosineImages(image_every)
        if run is None:
            try:
                import wandb
            except ImportError as err:
                raise ImportError('WandbSink needs wandb: pip install "gradconflict[wandb]"') from err
            run = wandb.run
            if run is None:
                raise ValueError("WandbSink: no active W&B run; call wandb.init(...) first, or pass run=")
        self.run = run
        self.prefix = prefix
        self.layers = layers

    def write(self, report: ConflictReport) -> None:
        """Log one step's scalars (and the heat-map image when one is due) at ``step=report.step``."""
        data: dict[str, Any] = {f"{self.prefix}/{k}": v for k, v in scalars(report, layers=self.layers).items()}
        if self._images.due(report):
            import wandb

            data[f"{self.prefix}/cosine"] = wandb.Image(self._images.image(report), caption=f"step {report.step}")
        self.run.log(data, step=report.step)

    def close(self) -> None:
        """Nothing to release: the run is the caller's to finish."""

    def __repr__(self) -> str:
        return f"WandbSink({getattr(self.run, 'name', self.run)!r})"
