"""The monitor's options, checked before anything is attached: each bad value raises an error that names the
option and what it accepts."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from gradconflict.measure.engine import ENGINES

__all__ = ["OnNonFinite", "check_options"]

OnNonFinite = Literal["raise", "skip", "propagate"]


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_options(
    model: object,
    *,
    engine: str,
    every: int,
    threshold: float,
    on_nonfinite: str,
    accumulation_steps: int,
    scaler: Any,
    start_step: int,
) -> None:
    """Raise ``TypeError`` or ``ValueError`` for the first option that ``ConflictMonitor`` cannot take."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _positive("every", every)
    _positive("accumulation_steps", accumulation_steps)
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine and must be a number in [-1, 1], got {threshold!r}")
    if on_nonfinite not in ("raise", "skip", "propagate"):
        raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'propagate', got {on_nonfinite!r}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if engine == "representation" and accumulation_steps > 1:
        raise ValueError("engine='representation' does not support accumulation_steps > 1; use engine='auto'")
    if scaler is not None and not callable(getattr(scaler, "scale", None)):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
