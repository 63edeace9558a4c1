"""The measuring pass of one step, and its one fallback.

Everything the monitor does to measure a step runs before ``.grad`` is touched: the plan, the engine's
backward, the unscaling, the checks and the report. ``.grad`` is then written once, by the one ordinary backward
(``write``). Whatever raises inside the pass, other than a refusal addressed to the user (a bad input or option,
named, before anything is written), the step falls back to that plain backward and is recorded as skipped, with
a :class:`MeasurementWarning` the first time each kind of failure happens: ``.grad`` is never half-written and
the run goes on. Under a global ``sync`` the error is raised instead, since a rank that stopped measuring would
leave the others waiting in a collective.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from torch import Tensor

from gradconflict.measure.checkpoint import BufferGuard, segment_module
from gradconflict.measure.distributed import Sync
from gradconflict.measure.engine import Engine, Measurement, MeasurementRefused, Plan, TappedEngine
from gradconflict.measure.engine.base import measuring
from gradconflict.measure.graph import walk_graph
from gradconflict.measure.report import ConflictReport
from gradconflict.measure.tasks import TaskLosses
from gradconflict.monitor._assemble import Assembler
from gradconflict.monitor._guard import NonFiniteGuard
from gradconflict.monitor._plan import Planner
from gradconflict.monitor._scaling import Scaling
from gradconflict.monitor._weights import FREED, graph_freed
from gradconflict.weighting import StepWeights

if TYPE_CHECKING:
    from gradconflict.measure.distributed import Reduction

__all__ = ["MeasurementWarning", "MeasuringPass"]

R = TypeVar("R")


class MeasurementWarning(RuntimeWarning):
    """A step could not be measured because of an error inside gradconflict; it was trained as usual (``.grad``
    as a plain backward gives) and is recorded as skipped."""


def _fingerprint(names: list[str]) -> int:
    """A fingerprint of a sorted list of names (an integer the ranks can compare), 0 for none."""
    return 0 if not names else zlib.crc32("\n".join(names).encode()) + 1


def _reached_layers(losses: Sequence[Tensor], plan: Plan) -> set[str]:
    """The layers of ``plan``'s shared parameters that the graph below ``losses`` reaches (inside a reentrant
    checkpoint that runs a module: that module's)."""
    graph = walk_graph(list(losses))
    inside = (segment_module(node) for node in graph.checkpoints)
    leaves = [*graph.leaves, *(p for module in inside if module is not None for p in module.parameters())]
    return {plan.layer_of[id(t)] for t in leaves if id(t) in plan.shared and id(t) in plan.layer_of}


class MeasuringPass:
    """Measures steps for one monitor, with its collaborators (each one concept, see their modules)."""

    def __init__(
        self,
        planner: Planner,
        engine: Engine,
        scaling: Scaling,
        guard: NonFiniteGuard,
        weighting: StepWeights,
        assembler: Assembler,
        buffers: BufferGuard,
        sync: Sync | None,
    ) -> None:
        self.planner = planner
        self.engine = engine
        self.scaling = scaling
        self.guard = guard
        self.weighting = weighting
        self.assembler = assembler
        self.buffers = buffers
        self.sync = sync
        self._warned: set[str] = set()

    def attempt(self, run: Callable[[], R], *, engine: bool = True) -> R | str:
        """``run()``, or the reason it failed (warned once per kind). ``engine``: it runs an engine's backward,
        inside :func:`~gradconflict.measure.engine.base.measuring` and with the buffers put back after it."""
        try:
            if not engine:
                return run()
            with self.buffers, measuring():
                return run()
        except MeasurementRefused:
            raise
        except Exception as err:  # the training run must go on
            return self._failed(err)

    def plan(self, batch: TaskLosses) -> Plan | str:
        """This step's plan, or why it cannot be measured. A task that never reached the shared parameters, or no
        parameter shared at all, raises ``ValueError`` (a setup to fix, before anything is written)."""
        try:
            return self.planner.plan_for(batch)
        except ValueError:
            raise
        except Exception as err:
            return self._failed(err)

    def _failed(self, err: Exception) -> str:
        if graph_freed(err):
            raise RuntimeError(FREED) from err
        if self.sync is not None and self.sync.is_global:
            raise err  # a rank that stopped measuring would leave the others waiting in a collective
        first = str(err).splitlines()[0] if str(err) else ""
        reason = f"measurement failed: {type(err).__name__}: {first}"
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"gradconflict: {reason}; the step was trained as usual and is recorded as skipped (if it recurs, "
                'engine="reference" measures with T plain backward passes)',
                MeasurementWarning,
                stacklevel=5,
            )
        return reason

    def step(
        self, batch: TaskLosses, step: int, write: Callable[[], object] | None, ids: Tensor | None = None
    ) -> ConflictReport:
        """Measure one step, then write ``.grad`` (``write``, if any) once, unless the step is skipped as
        non-finite or raised; returns the recorded report. With ``ids`` (one per example), the step's Gram is
        attributed to the examples too (``report.samples``)."""
        plan = self.plan(batch)
        counts, disagreement = self.agree(batch, step, ids, plan)
        if isinstance(plan, str) or disagreement is not None:
            return self.fallback(batch, step, disagreement or cast(str, plan), write)
        dtype = self.planner.report_dtype

        def measure() -> Measurement:
            roots = self.scaling.roots(batch)
            if ids is None:
                return self.engine.measure(roots, plan, self.reduction(step))
            engine = cast(TappedEngine, self.engine)  # the monitor checked it
            return engine.attribute(roots, plan, len(ids), self.reduction(step))

        outcome = self.attempt(lambda: self.scaling.unscale_measurement(measure(), dtype))
        if isinstance(outcome, str):
            return self.fallback(batch, step, outcome, write)
        verdict = self.guard.check(batch, outcome.gram.diagonal(), step, write is not None)
        if verdict.zero:
            self.planner.warn_detached(batch, verdict.zero, step)
        if verdict.skip:
            return self.fallback(batch, step, verdict.skip, write if verdict.write else None)
        # the weighting's lambda from this step's Gram, before the backward that applies it
        weights = self.weighting.update(batch, outcome.gram)
        report = self.attempt(
            lambda: self.assembler.measured(batch.names, outcome, weights, batch.loss_vector(), step), engine=False
        )
        if isinstance(report, str):
            return self.fallback(batch, step, report, write)
        if ids is not None and outcome.samples is not None:
            samples = self.scaling.unscale_samples(outcome.samples.result(ids, batch.names))
            if counts is not None and self.sync is not None:  # every rank's examples, on every rank
                samples = self.sync.gather_samples(samples, counts)
            report.samples = samples
        if write is not None:
            write()
        return self.assembler.record(report)

    def agree(
        self, batch: TaskLosses, step: int, ids: Tensor | None, plan: Plan | str
    ) -> tuple[list[int] | None, str | None]:
        """Under a global sync, what the ranks must agree on before any collective of the step's measurement
        (:meth:`compare`, with each rank's number of ``sample_ids``): the numbers (``None`` in one process, with
        ``"local"``, or when no rank passed any) and the reason to skip the step, if any. Every rank raises
        ``ValueError`` alike when some ranks passed ``sample_ids`` and others did not."""
        if self.sync is None or not self.sync.is_global:
            return None, None
        layers = set() if isinstance(plan, str) else _reached_layers(batch.losses, plan)
        rows, reason = self.compare(0 if ids is None else len(ids), plan, layers, batch.loss_vector().device)
        counts = [row[0] for row in rows]
        given = [rank for rank, n in enumerate(counts) if n]
        if given and len(given) < len(counts):
            missing = [rank for rank, n in enumerate(counts) if not n]
            raise ValueError(
                f"sample_ids was passed on rank(s) {given} but not on rank(s) {missing} at step {step}: under "
                f"sync={self.sync.mode!r} the ranks attribute one global step together; pass sample_ids on every "
                "rank or on none (nothing was measured or written)"
            )
        return (counts if given else None), reason

    def compare(
        self, value: int, plan: Plan | str, layers: set[str], device: torch.device
    ) -> tuple[list[list[int]], str | None]:
        """Every rank's ``value`` and fingerprints of its ``plan``'s shared parameters and of the shared ``layers``
        its measurement will reduce, from one all-reduce of 4 integers per rank (under a global sync). Ranks whose
        plans or layers differ would run different collectives (a failed or hung collective, or Grams summed across
        different layers): every rank then gets the reason to skip, warned once (the step trains as usual)."""
        assert self.sync is not None
        names = [] if isinstance(plan, str) else sorted(self.planner.shared.names.get(i, "") for i in plan.shared)
        rows = self.sync.rows([value, _fingerprint(names), _fingerprint(sorted(layers)), len(layers)], device)
        reason = None
        if len({row[1] for row in rows}) > 1:
            reason = (
                "the ranks measure different shared parameters (with shared=None each rank finds them from its own "
                "steps): pass shared= (the same on every rank)"
            )
        elif len({row[2] for row in rows}) > 1:
            reason = (
                "this step's graph reaches different shared layers on different ranks (a layer that some ranks' "
                "batches leave unused, as an expert of a mixture or a branch taken on some ranks only): pass shared= "
                "without the layers that may go unused"
            )
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"gradconflict: {reason}; the step was trained as usual and is recorded as skipped on every rank "
                f"(reached shared layers per rank: {[row[3] for row in rows]})",
                MeasurementWarning,
                stacklevel=5,
            )
        return rows, reason

    def fallback(
        self, batch: TaskLosses, step: int, reason: str, write: Callable[[], object] | None
    ) -> ConflictReport:
        """A step trained without a measurement: ``write`` (if any), then recorded as skipped, with ``reason``."""
        if write is not None:
            write()
        weights = self.weighting.effective(batch)
        return self.assembler.record(self.assembler.skipped(batch.names, step, reason, batch.loss_vector(), weights))

    def reduction(self, step: int) -> Reduction | None:
        """This step's reduction across the ranks (``None`` in one process)."""
        return None if self.sync is None else self.sync.reduction(step)
