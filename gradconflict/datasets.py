"""Small multi-task data sets built offline, for the demo, the examples and the tests.

:func:`overlaid_digits` is a MultiMNIST-style task pair made from scikit-learn's bundled 8 x 8 digits (no
download): two digits overlaid with a horizontal offset on one canvas; one task reads the left digit, the other
the right one. Both tasks share every pixel, and the overlap makes them compete for the same features.

>>> data = overlaid_digits(32, seed=0)
>>> data.x.shape, sorted(data.targets)
(torch.Size([32, 1, 8, 12]), ['left', 'right'])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MultiTaskData", "overlaid_digits"]


@dataclass
class MultiTaskData:
    """Inputs ``x`` and one target tensor per task, with a seeded mini-batch iterator."""

    x: Tensor
    targets: dict[str, Tensor]

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, fraction: float) -> tuple[MultiTaskData, MultiTaskData]:
        """The first ``fraction`` of the examples and the rest."""
        k = int(len(self) * fraction)
        return (
            MultiTaskData(self.x[:k], {t: y[:k] for t, y in self.targets.items()}),
            MultiTaskData(self.x[k:], {t: y[k:] for t, y in self.targets.items()}),
        )

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Endless shuffled mini-batches ``(x, {task: target})``, the same sequence for the same seed."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=generator)
            for start in range(0, len(self) - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                yield self.x[idx], {t: y[idx] for t, y in self.targets.items()}


def overlaid_digits(n: int = 2048, offset: int = 4, seed: int = 0) -> MultiTaskData:
    """``n`` canvases of size 8 x (8 + ``offset``), each the pixel-wise maximum of a left and a right digit.

    Targets: ``"left"`` and ``"right"``, the two digit classes (0-9). Needs scikit-learn
    (``pip install 'gradconflict[demo]'``), whose bundled digits are read from disk.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("overlaid_digits needs scikit-learn: pip install 'gradconflict[demo]'") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(seed)
    left = torch.randint(len(images), (n,), generator=generator)
    right = torch.randint(len(images), (n,), generator=generator)
    canvas = torch.zeros(n, 1, 8, 8 + offset)
    canvas[:, 0, :, :8] = images[left]
    canvas[:, 0, :, offset:] = torch.maximum(canvas[:, 0, :, offset:], images[right])
    return MultiTaskData(canvas, {"left": labels[left], "right": labels[right]})
