"""``engine="representation"``: MGDA-UB's approximation, the Gram of the task gradients with respect to the shared
module's *output* instead of its parameters. Near free (one small backward per task, through its own head), but
not the Gram over the parameters: reports from it are marked ``approximate``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gradconflict.measure.capture import OutputCapture, RetainedGrads
from gradconflict.measure.engine.base import LayerResult, Measurement, MeasurementRefused, NothingLearned, Plan
from gradconflict.measure.rules.base import gram_of

if TYPE_CHECKING:
    from gradconflict.measure.distributed import Reduction

__all__ = ["RepresentationEngine"]


class RepresentationEngine(NothingLearned):
    """Keeps the shared module's latest output (a forward hook) and measures the Gram there."""

    name = "representation"
    approximate = True
    strategy = "representation"

    def __init__(self, model: nn.Module, shared: nn.Module) -> None:
        name = next((n for n, m in model.named_modules() if m is shared), "shared")
        self.capture = OutputCapture(shared, name)
        self.retained = RetainedGrads()

    def arm(self, on: bool) -> None:
        """The output is always kept (a reference, no copy)."""

    def restrict(self, shared: set[int]) -> None:
        """The measured point is the shared module's output, whatever the parameters."""

    def close(self) -> None:
        """Remove the hook."""
        self.capture.close()
        self.retained.close()

    def measure(self, losses: Sequence[Tensor], plan: Plan, reduction: Reduction | None = None) -> Measurement:
        """The Gram of the task gradients at the shared module's output (across processes, of their mean)."""
        Z = self.capture.output
        if Z is None:
            raise MeasurementRefused(
                "engine='representation' found no output of the shared module in this step's forward: pass "
                "shared=<the backbone module> and run the model's forward before monitor.backward()"
            )
        # One small backward per task: each reaches Z through its own head only, which costs less than a vmapped
        # pass that carries every task through every head.
        with self.retained.kept():
            per_task = torch.stack(
                [torch.autograd.grad(loss, [Z], retain_graph=True, materialize_grads=True)[0] for loss in losses]
            )
        self.capture.output = None
        gram = gram_of(per_task.to(plan.gram_dtype).flatten(1))
        if reduction is not None:
            # Each rank's representation holds its own samples: the coordinates do not overlap, so the global
            # Gram of the mean gradient has no cross-rank term, (1/R^2) sum_r G_r, exactly, whatever the mode.
            gram = reduction.sync.all_reduce(gram.clone()) / reduction.sync.world**2
        layer = LayerResult(gram, num_params=Z[0].numel(), routes={"representation"})
        return Measurement(gram, {self.capture.name: layer}, "representation")

    def gradients(self, losses: Sequence[Tensor], plan: Plan) -> dict[int, tuple[Tensor, Tensor]]:
        """Not available: this engine never sees the parameters' gradients."""
        raise MeasurementRefused("engine='representation' cannot sum per-task gradients over micro-batches; use 'auto'")
