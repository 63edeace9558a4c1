"""The advice on one problem, as a user gets it: train the shared model under a ConflictMonitor and ask.

The shared model trains for the comparison's budget (:data:`~benchmarks.diagnosis.truth.STEPS` steps of Adam),
with every step measured, on the problem's data (seed 0), and ``advise(history, model=...)`` reads the run. When
the advice is provisional ("not enough steps yet: measure about N more"), the run goes on for the steps it asks for
(at most :data:`MAX_MORE` more, once), as a user following the advice would, and the advice is read again. Both
readings are kept: the first look and the final one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gradconflict import ConflictMonitor
from gradconflict.diagnosis import Advice, advise
from gradconflict.fixtures.synthetic import Spec, build_problem

from .truth import BATCH, LR, STEPS

#: The most steps the benchmark adds when the advice asks for more.
MAX_MORE = 3 * STEPS


@dataclass
class AdviceRun:
    """The advice's first and final readings of one problem."""

    first: Advice
    final: Advice
    steps: int  # measured steps behind the final reading
    seconds: float


def block_of(layer: str | None) -> str | None:
    """``"backbone.2.side"`` -> ``"backbone.2"`` (the block a layer belongs to)."""
    return None if layer is None else ".".join(layer.split(".")[:2])


def advice_run(spec: Spec) -> AdviceRun:
    """Train, advise, and follow a request for more steps once."""
    started = time.perf_counter()
    problem = build_problem(spec, 0)
    model = problem.model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    batches = problem.batches(BATCH)
    with ConflictMonitor(model, max_history=None) as monitor:

        def train(steps: int) -> None:
            for _ in range(steps):
                x, y = next(batches)
                optimizer.zero_grad()
                monitor.backward(problem.losses(x, y))
                optimizer.step()

        train(STEPS)
        first = advise(monitor.history, model=model)
        final, steps = first, STEPS
        needed = first.uncertainty.training_steps_needed
        if not first.uncertainty.decided and needed is not None and needed <= MAX_MORE:
            train(needed)
            steps += needed
            final = advise(monitor.history, model=model)
    return AdviceRun(first, final, steps, time.perf_counter() - started)
