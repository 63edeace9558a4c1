"""The non-finite guard: what a measured step with a NaN or infinite loss or gradient does (``on_nonfinite``), and
which tasks' gradients on the shared parameters are exactly zero, read in the same host sync."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradconflict.measure.distributed import Sync
from gradconflict.measure.tasks import TaskLosses
from gradconflict.monitor._options import OnNonFinite

__all__ = ["NonFiniteGuard", "Verdict"]


@dataclass
class Verdict:
    """What a checked step does: why it is skipped (``""``: it is not), whether ``.grad`` is written, and the
    tasks whose gradient on the shared parameters is exactly zero."""

    skip: str = ""
    write: bool = True
    zero: list[str] = field(default_factory=list)


class NonFiniteGuard:
    """Checks a measured step's losses and gradient norms (the Gram's diagonal) with one host sync.

    Args:
        on_nonfinite: ``"raise"``, ``"skip"`` or ``"propagate"`` (no check and no sync).
        scaled: whether a GradScaler is used: an overflow then writes ``.grad`` (the scaler must see it).
        sync: the ranks' synchronisation, so that every rank takes the same decision (``None``: one process).
    """

    def __init__(self, on_nonfinite: OnNonFinite, scaled: bool, sync: Sync | None) -> None:
        self.on_nonfinite = on_nonfinite
        self.scaled = scaled
        self.sync = sync

    def check(self, batch: TaskLosses, norms: Tensor | None, step: int, write: bool) -> Verdict:
        """The verdict on a step (``norms``: each task's squared gradient norm, ``None`` when nothing was
        measured; ``write``: whether the call writes ``.grad``). Raises ``FloatingPointError`` under
        ``"raise"``, and ``ValueError`` for device weights that are negative or not finite."""
        if self.on_nonfinite == "propagate":
            return Verdict(write=write)
        T = len(batch.names)
        parts = [torch.isfinite(batch.loss_vector())]
        if norms is not None:
            norms = norms.to(parts[0].device)
            parts += [torch.isfinite(norms), norms != 0]
        device_weights = batch.device_weights
        if device_weights:
            w = torch.stack([x.detach() for x in device_weights])
            parts.append((torch.isfinite(w) & (w >= 0)).to(parts[0].device))
        flags = torch.cat(parts)
        if self.sync is not None:
            flags = self.sync.all_true(flags)  # every rank takes the same decision
        ok = flags.tolist()
        if device_weights and not all(ok[-len(device_weights) :]):
            raise ValueError("a task weight tensor is negative or not finite; weights must be finite and >= 0")
        bad_loss = [n for n, good in zip(batch.names, ok[:T]) if not good]
        bad_grad = [n for n, good in zip(batch.names, ok[T : 2 * T]) if not good] if norms is not None else []
        zero = [n for n, good in zip(batch.names, ok[2 * T : 3 * T]) if not good] if norms is not None else []
        if bad_loss:
            what = f"non-finite loss for task(s) {bad_loss}"
        elif bad_grad and self.scaled and write:
            # The scaler must see the overflow in .grad to skip its step and lower its scale.
            return Verdict(f"gradient overflow for task(s) {bad_grad}: the GradScaler skips this step", True)
        elif bad_grad:
            what = f"non-finite gradient for task(s) {bad_grad}"
        else:
            return Verdict(write=write, zero=zero)
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{what} at step {step}; nothing was written to .grad. Pass on_nonfinite='skip' to skip such steps"
            )
        return Verdict(what, False)
