"""When a dashboard sink sends a cosine heat-map image, and the image itself.

An image is due at the first measured step that carried two tasks or more, and then at the first such step at
least ``every`` training steps after the last image (with ``every=k`` sampling the steps measured need not fall
on multiples of ``every``).

>>> import torch
>>> from gradconflict import ConflictReport
>>> images = CosineImages(every=10)
>>> [s for s in range(0, 30, 4) if images.due(ConflictReport("ab", torch.eye(2), step=s))]
[0, 12, 24]
"""

from __future__ import annotations

import numpy as np

from gradconflict.measure.report import ConflictReport

__all__ = ["CosineImages"]


class CosineImages:
    """The schedule of a sink's cosine heat-map images: one every ``every`` training steps (``None`` or 0:
    never). Checks at construction that matplotlib, which draws them, is installed.

    >>> CosineImages(None).due(ConflictReport("ab", __import__("torch").eye(2)))
    False
    """

    def __init__(self, every: int | None) -> None:
        if every is not None and (not isinstance(every, int) or every < 0):
            raise ValueError(f"image_every must be a non-negative number of steps or None, got {every!r}")
        self.every = every or 0
        self._last: int | None = None
        if self.every:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "the cosine heat-map images need matplotlib: pip install matplotlib (or pass image_every=None)"
                ) from err

    def due(self, report: ConflictReport) -> bool:
        """Whether this step gets an image (and, if so, note it as the last one)."""
        if not self.every or report.skipped or len(report.tasks) < 2:
            return False
        if self._last is not None and report.step - self._last < self.every:
            return False
        self._last = report.step
        return True

    @staticmethod
    def image(report: ConflictReport) -> np.ndarray:
        """The step's cosine heat-map as an ``[H, W, 3]`` uint8 RGB array (tasks in sorted order)."""
        from gradconflict.reporting.plots import cosine_heatmap, figure_to_rgb

        order = sorted(range(len(report.tasks)), key=lambda k: report.tasks[k])
        cosine = report.cosine.double().numpy()[np.ix_(order, order)]
        tasks = [report.tasks[k] for k in order]
        return figure_to_rgb(cosine_heatmap(cosine, tasks, f"Cosine of the task gradients, step {report.step}"))
