"""Engines: each produces the per-layer task-gradient Grams of one step. None writes ``.grad``: the monitor
lets autograd do that, with one ordinary backward of the weighted loss.

* :class:`TappedEngine` (``engine="auto"``): one vectorised VJP over the T task losses, per-layer rules.
* :class:`ReferenceEngine` (``engine="reference"``): T separate ``torch.autograd.grad`` calls; slow, obvious.
* :class:`RepresentationEngine` (``engine="representation"``): the Gram at the shared module's output;
  approximate.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradconflict.measure.engine.base import (
    Engine,
    LayerResult,
    Measurement,
    MeasurementRefused,
    PerformanceWarning,
    Plan,
    is_measuring,
)
from gradconflict.measure.engine.loop import ReferenceEngine
from gradconflict.measure.engine.representation import RepresentationEngine
from gradconflict.measure.engine.tapped import TappedEngine

__all__ = [
    "ENGINES",
    "Engine",
    "LayerResult",
    "Measurement",
    "MeasurementRefused",
    "PerformanceWarning",
    "Plan",
    "ReferenceEngine",
    "RepresentationEngine",
    "TappedEngine",
    "is_measuring",
    "make_engine",
]

#: The engine names ``ConflictMonitor(engine=...)`` accepts.
ENGINES = ("auto", "reference", "representation")


def make_engine(name: str, model: nn.Module, shared: nn.Module | None = None, **options: Any) -> Engine:
    """The engine called ``name`` (one of :data:`ENGINES`), attached to ``model``; ``options`` go to the
    default engine (``strategy``, ``loop_memory``)."""
    if name == "auto":
        return TappedEngine(model, **options)
    if name == "reference":
        return ReferenceEngine()
    if name == "representation":
        if not isinstance(shared, nn.Module):
            raise ValueError(
                "engine='representation' measures gradients at the shared module's output: pass shared=<the "
                "backbone module> (a module whose forward output every head reads)"
            )
        return RepresentationEngine(model, shared)
    raise ValueError(f"unknown engine {name!r}; choose one of {list(ENGINES)}")
