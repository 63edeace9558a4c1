"""A ``torch.amp.GradScaler`` in a monitored run: ``.grad`` is written scaled, as ``scaler.scale(total).backward()``
would, the measurement runs on the scaled losses (their gradients overflow exactly when the training backward's
do), and the report is unscaled.

A scale can grow to 2^64 and beyond (bf16 autocast lets it, in about 96k steps), where the squared scaled
gradients overflow float32 and the squared scale does too. So with a scaler the Gram is accumulated in float64
and unscaled there, then given in the shared parameters' own Gram dtype: at any scale, a step whose gradients are
finite reads as finite, and an overflow is only called so when the scaled gradients themselves overflowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradconflict.measure.attribution import SampleAttribution
from gradconflict.measure.engine import Measurement
from gradconflict.measure.shared import gram_dtype
from gradconflict.measure.tasks import TaskLosses

__all__ = ["Scaling", "in_dtype"]


class Scaling:
    """What a GradScaler (``scaler``, or ``None``) changes in a step."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def gram_dtype(self, shared: Sequence[nn.Parameter]) -> torch.dtype:
        """The dtype the engine accumulates the Gram in: float64 under a scaler (see the module's note)."""
        return gram_dtype(shared) if self.scaler is None else torch.float64

    def backward(self, total: Tensor) -> None:
        """The training backward of ``total``, scaled."""
        (total if self.scaler is None else self.scaler.scale(total)).backward()

    def roots(self, batch: TaskLosses) -> list[Tensor]:
        """The losses the engine differentiates: scaled like the training loss."""
        return batch.losses if self.scaler is None else [self.scaler.scale(loss) for loss in batch.losses]

    def _scale(self, device: torch.device) -> Tensor:
        """The current scale as a float64 tensor on ``device``, read without a host sync."""
        return self.scaler.scale(torch.ones((), dtype=torch.float64, device=device))

    def unscale_measurement(self, measurement: Measurement, dtype: torch.dtype) -> Measurement:
        """The measurement's Grams divided by the squared scale in float64, then given in ``dtype``."""
        if self.scaler is None:
            return measurement
        squared = self._scale(measurement.gram.device) ** 2
        measurement.gram = measurement.gram.double() / squared
        for entry in measurement.layers.values():
            entry.gram = entry.gram.double() / squared
        return in_dtype(measurement, dtype)

    def unscale_samples(self, samples: SampleAttribution) -> SampleAttribution:
        """A step's attribution with every inner product divided by the squared scale."""
        if self.scaler is None:
            return samples
        return samples.scaled((1 / self._scale(samples.gram.device) ** 2).to(samples.gram.dtype))

    def unscale_gradients(
        self, grads: dict[int, tuple[Tensor, Tensor]]
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Materialised per-task gradients ``id -> (parameter, [T, *shape])`` divided by the scale (before any
        squaring: in their own dtype they are finite exactly when the scaled ones are)."""
        if self.scaler is None:
            return grads
        return {k: (leaf, (g.double() / self._scale(g.device)).to(g.dtype)) for k, (leaf, g) in grads.items()}

    def scale_gradients(
        self, grads: dict[int, tuple[Tensor, Tensor]]
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """:meth:`unscale_gradients` undone: per-task gradients in the scaled backward's units, those of the
        output gradients that an accumulation group's micro-batches hold (their attribution is then unscaled as a
        step's, by :meth:`unscale_samples`). Under a scaler the gradients are float64 (the Gram dtype)."""
        if self.scaler is None:
            return grads
        return {k: (leaf, g * self._scale(g.device).to(g.dtype)) for k, (leaf, g) in grads.items()}


def in_dtype(measurement: Measurement, dtype: torch.dtype) -> Measurement:
    """``measurement`` with its Grams in ``dtype`` (the report's, after a float64 accumulation)."""
    measurement.gram = measurement.gram.to(dtype)
    for entry in measurement.layers.values():
        entry.gram = entry.gram.to(dtype)
    return measurement
