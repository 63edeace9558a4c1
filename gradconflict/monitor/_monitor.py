"""``ConflictMonitor``: attach to a multi-task model, replace ``loss.backward()``, get a report per step.

The monitor only schedules: its engine measures the per-task Gram, and ``.grad`` is written by autograd's own
backward of ``sum_i w_i L_i``, so tensor hooks, post-accumulate hooks, DDP's reducer, GradScaler and gradient
accumulation behave exactly as in a loop without the monitor. This module is the facade; each concept lives in a
module of its own: the options (``_options``), which models are tapped (``_attach``), the plan of a step
(``_plan``), the measuring pass and its fallback (``_measuring``), the non-finite guard (``_guard``), the
GradScaler (``_scaling``), the weights and the ``.grad`` write (``_weights``), micro-batches (``_microbatch``),
the reports (``_assemble``) and the resumable state (``_state``).

>>> import torch, torch.nn as nn
>>> torch.manual_seed(0) and None
>>> backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
>>> heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
>>> model = nn.ModuleDict({"backbone": backbone, "heads": heads})
>>> monitor = ConflictMonitor(model)
>>> h = backbone(torch.randn(16, 4))
>>> report = monitor.backward({"a": heads["a"](h).pow(2).mean(), "b": heads["b"](h).mean()})
>>> report.tasks, tuple(report.gram.shape), sorted(report.layers)
(('a', 'b'), (2, 2), ['backbone.0'])
>>> monitor.close()
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from gradconflict.measure.attribution import sample_ids
from gradconflict.measure.checkpoint import BufferGuard
from gradconflict.measure.distributed import Sync
from gradconflict.measure.engine import Engine, TappedEngine, make_engine
from gradconflict.measure.metrics import CONFLICT_COSINE
from gradconflict.measure.report import ConflictReport
from gradconflict.measure.shared import SharedParameters
from gradconflict.measure.tasks import TaskKey, task_losses
from gradconflict.monitor._assemble import Assembler
from gradconflict.monitor._attach import attach, unwrap
from gradconflict.monitor._guard import NonFiniteGuard
from gradconflict.monitor._measuring import MeasurementWarning, MeasuringPass
from gradconflict.monitor._microbatch import MicroBatches
from gradconflict.monitor._options import OnNonFinite, check_options
from gradconflict.monitor._plan import DetachedTaskWarning, Planner
from gradconflict.monitor._scaling import Scaling
from gradconflict.monitor._state import MonitorState
from gradconflict.monitor._weights import weights_by_task, write_grads
from gradconflict.records.history import EMA_DECAY, MAX_HISTORY, History, Sink
from gradconflict.weighting import StepWeights, WeightingSpec

if TYPE_CHECKING:
    from gradconflict.diagnosis import Advice

__all__ = ["ConflictMonitor", "DetachedTaskWarning", "MeasurementWarning"]


def _shut(release: Callable[[], object], engine: Engine, history: History) -> None:
    release()
    engine.close()
    history.close()


class ConflictMonitor:
    """Measures the per-task gradients of a multi-task model on its shared parameters at each step.

    Args:
        model: the whole model (backbone and heads), or a ``DistributedDataParallel`` wrapping it. Nothing is
            stored on it: the taps are a global forward hook acting on its modules only, removed by :meth:`close`
            (or leaving a ``with`` block, or when the monitor is garbage-collected).
        shared: the shared parameters: a module (its parameters that require grad, read at each step), an
            iterable of parameters, or ``None`` to discover them at the first step that carries two or more tasks,
            as the parameters that receive gradient from two or more of them (and again whenever the parameters
            that require grad change: unfrozen, frozen, added or removed).
        engine: ``"auto"`` (one batched backward with per-layer rules, exact), ``"reference"`` (T separate
            backward passes, for checking) or ``"representation"`` (gradients at the output of ``shared``, which
            must then be a module: near free, approximate, and its reports say so).
        every: measure every ``every``-th (logical) step; the others are a plain backward.
        threshold: cosine below which a task pair counts as conflicting (``S``), in [-1, 1].
        on_nonfinite: what a measured step with a NaN or infinite loss or gradient does. ``"raise"`` (default):
            ``FloatingPointError``, nothing written to ``.grad``; ``"skip"``: the step is recorded as skipped and
            ``.grad`` is left untouched. Both read the losses and the Gram's diagonal on the host (one sync per
            measured step). ``"propagate"``: no check and no sync; NaNs reach ``.grad`` as with a plain backward,
            and the history records such a step as skipped. With a ``scaler``, an overflowing step always writes
            ``.grad`` (the scaler must see it) and is reported as skipped.
        ema_decay: decay of the history's moving averages.
        max_history: steps the in-memory history keeps (the oldest are dropped; ``None``: all).
        accumulation_steps: micro-batches per optimizer step. Each :meth:`backward` call adds its micro-batch to
            ``.grad`` as usual; the last one of each group returns the report of the whole (logical) step, whose
            Gram is that of the summed task gradients. Measured logical steps hold one copy of every shared
            parameter per task while they accumulate.
        scaler: a ``torch.amp.GradScaler``: ``.grad`` is written as ``scaler.scale(total).backward()`` would, the
            Gram is measured on the scaled losses, accumulated and unscaled in float64 (exact at any scale) and
            reported in the shared parameters' dtype.
        sinks: where each measured step goes as it is collected (e.g. ``[JSONLSink("run.jsonl")]``).
        allow_other_monitors: attach even if another open monitor taps the same model.
        sync: under ``torch.distributed`` (DDP, FSDP), how the ranks' measurements combine: ``"exact"`` (the
            global batch's Gram; all-reduces T x the shared parameters per measured step), ``"sketch"`` (an
            unbiased estimate from one all-reduce of ``layers x T x sketch_size`` numbers) or ``"local"`` (each
            rank's own batch, no communication). See :mod:`gradconflict.measure.distributed`. Ignored in one process.
        process_group: the group to synchronise over (default: the DDP wrapper's, else the default group).
        sketch_size: k, the numbers per task and layer of a sketch.
        sinks_rank: the only rank whose sinks write (``None``: every rank's). Every rank keeps a history.
        strategy: how the default engine runs a measured step: ``"batched"`` (one vectorised backward over the
            tasks), ``"loop"`` (one backward per task; T copies of the shared gradients) or ``"auto"`` (default:
            both are timed on the first measured steps of each shape of step, and the faster is kept; see
            :attr:`plan`). Every strategy is exact. Under ``sync="exact"`` or ``"sketch"`` the choice is one per
            number of tasks, and every rank makes the same one (each candidate judged by its slowest rank).
        loop_memory: the most bytes the per-task loop may hold (T x the shared gradients) to be a candidate.
        math_attention: run scaled-dot-product attention with torch's math kernel in the forwards that will be
            measured, so that the batched pass need not loop over the tasks for the fused kernels' backward (no
            batching rule on CPU in torch 2.13). Off by default: it changes those forwards' rounding (about 1e-7),
            and torch's attention flags are process-wide while it is on; they are put back afterwards.
        start_step: the step count to start from: a training framework's global step when the monitor joins a
            run, so that ``every`` measures the steps the framework logs.

    Attributes:
        history: a :class:`~gradconflict.History` of the measured (and skipped) steps.
        step: the number of (logical) steps so far: :meth:`backward` groups and :meth:`measure` calls.
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module | Iterable[nn.Parameter] | None = None,
        *,
        engine: str = "auto",
        every: int = 1,
        threshold: float = CONFLICT_COSINE,
        on_nonfinite: OnNonFinite = "raise",
        ema_decay: float = EMA_DECAY,
        max_history: int | None = MAX_HISTORY,
        accumulation_steps: int = 1,
        scaler: Any = None,
        sinks: Iterable[Sink] = (),
        allow_other_monitors: bool = False,
        sync: str = "exact",
        process_group: Any = None,
        sketch_size: int = 4096,
        sinks_rank: int | None = 0,
        strategy: str = "auto",
        loop_memory: int = 512 * 2**20,
        math_attention: bool = False,
        start_step: int = 0,
    ) -> None:
        check_options(
            model, engine=engine, every=every, threshold=threshold, on_nonfinite=on_nonfinite,
            accumulation_steps=accumulation_steps, scaler=scaler, start_step=start_step,
        )
        self._sync = Sync.resolve(model, sync, process_group, sketch_size)
        if self._sync is not None and sinks_rank is not None and self._sync.rank != sinks_rank:
            sinks = ()  # one rank writes the files and dashboards
        self.model = model
        inner = unwrap(model)
        release = attach(id(self), inner, allow_other_monitors)
        try:
            self._shared = SharedParameters(inner, shared)
            self.history = History(ema_decay=ema_decay, max_history=max_history, sinks=sinks)
            options = {"strategy": strategy, "loop_memory": loop_memory, "math_attention": math_attention}
            module = shared if isinstance(shared, nn.Module) else None
            self.engine: Engine = make_engine(engine, inner, module, **(options if engine == "auto" else {}))
        except BaseException:  # nothing is tapped yet
            release()
            raise
        self.every = every
        self.threshold = float(threshold)
        self.on_nonfinite = on_nonfinite
        self.accumulation_steps = accumulation_steps
        self.scaler = scaler
        self.step = start_step
        self._scaling = Scaling(scaler)
        self._weighting = StepWeights()
        self._planner = Planner(inner, self._shared, self.engine, self._scaling)
        self._measuring = MeasuringPass(
            self._planner,
            self.engine,
            self._scaling,
            NonFiniteGuard(on_nonfinite, scaler is not None, self._sync),
            self._weighting,
            Assembler(self.history, self.engine.name, self.engine.approximate, self.threshold, self._sync),
            BufferGuard(inner),
            self._sync,
        )
        self._micro = MicroBatches(accumulation_steps, self._measuring)
        self._state = MonitorState(self._shared, self.history, self._weighting, self.engine)
        self._release = weakref.finalize(self, _shut, release, self.engine, self.history)
        self.engine.arm(self._taps_wanted())

    # ------------------------------------------------------------------------------------------ state
    @property
    def shared_parameters(self) -> list[str]:
        """Names of the shared parameters (empty until discovered at a step with two or more tasks)."""
        return self._shared.state()

    @property
    def plan(self) -> dict[str, Any]:
        """How the engine measures: its strategy setting and, per shape of step (number of tasks, tapped layers'
        input shapes, whether the step is ``attributed`` to its examples), the strategy chosen, each candidate's
        best time over its trial steps, and how many it ran. Under ``sync="exact"`` or ``"sketch"``, one choice per
        number of tasks (``shapes`` empty), with each candidate's time on its slowest rank: the same on every
        rank.

        >>> import torch.nn as nn
        >>> ConflictMonitor(nn.Linear(2, 2), engine="reference").plan
        {'engine': 'reference', 'strategy': 'loop', 'choices': []}
        """
        return {"engine": self.engine.name, "strategy": self.engine.strategy, "choices": self.engine.state_dict()}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._release.alive

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the step count, the shared parameters, the history (with its averages), the
        weighting's state (its random generator or warm start, and the last weights) and the engine's strategy
        choices (so that they are not timed again).

        Plain Python values and CPU tensors: save it with ``torch.save`` next to the model's checkpoint, and load
        it back with ``torch.load(..., weights_only=True)``.
        """
        return self._state.save(self.step, self.shared_parameters)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a micro-batch group in progress is dropped). Every field is checked
        first: a malformed or foreign state raises ``ValueError`` naming the field, and changes nothing."""
        self._check_open()
        self.step = self._state.load(state)
        self._micro.reset()
        self._planner.reset()
        self.engine.arm(self._taps_wanted())

    # ------------------------------------------------------------------------------------------ steps
    def backward(
        self,
        losses: Mapping[TaskKey, Tensor],
        weights: Mapping[TaskKey, object] | Sequence[object] | Tensor | None = None,
        *,
        backward_fn: Callable[[], object] | None = None,
        weighting: WeightingSpec | None = None,
        sample_ids: Any = None,
    ) -> ConflictReport | None:
        """Replace ``(sum_i w_i L_i).backward()``: measure the step, then let autograd fill ``.grad`` as it would.

        ``losses`` maps task names to scalar losses; ``weights`` (default 1 each) maps the same names to numbers or
        scalar tensors (a tensor that requires grad receives its gradient, like a learned task weight). ``weights``
        may also be a list, a tuple or a 1-dimensional tensor with one weight per task, read in the order of
        ``losses``' keys (a dict keeps the order its keys were put in); an element of a tensor that requires grad
        keeps it.

        ``backward_fn``, when given, writes ``.grad`` in place of the monitor's own backward of ``sum_i w_i L_i``:
        a training framework passes its own backward of its own loss (scaled, divided for accumulation, with
        extra terms), called once per call at the point where the monitor would write.

        ``weighting`` (a method name such as ``"upgrad"``, a :class:`~gradconflict.weighting.Weighting`, a
        ``(gram, losses) -> weights`` function or a TorchJD ``Weighting``) makes the update conflict-aware: the
        shared parameters get ``sum_i lambda_i w_i g_i`` with ``lambda`` from this step's Gram (the last measured
        step's on an unmeasured one), each task's own parameters the gradient of ``w_i L_i``, and the report's
        ``weights`` are ``lambda_i w_i``. Pass the same name or object at every step (it keeps its state); see
        :mod:`gradconflict.weighting`.

        ``sample_ids`` (a 1-D integer tensor or sequence, one id per example of the batch, e.g. dataset indices)
        attributes the measured step's Gram to the examples: ``report.samples`` (a
        :class:`~gradconflict.measure.attribution.SampleAttribution`) holds each example's contribution
        ``<g_i^(n), g_j>`` and its within-example cosines. Dim 0 of every measured layer's input is the example.
        Under ``sync="exact"`` across processes, pass each rank's own ids on every rank (on a step, all ranks or
        none: otherwise every rank raises ``ValueError``): each example is attributed against the global
        ``g_j``, and every rank's report holds every rank's examples, in rank order (``sync="sketch"`` refuses
        ``sample_ids``; with ``"local"`` each rank attributes its own against its own batch). With
        ``accumulation_steps > 1``, pass each micro-batch's ids on every micro-batch of a group: the group's report
        attributes its Gram to all of the group's examples, each against the group's ``g_j`` (every measured
        layer's input and output gradients are held until the group ends).

        Returns this step's :class:`~gradconflict.ConflictReport`; ``None`` on a step that ``every`` leaves
        unmeasured (a plain backward) and on every micro-batch but the last of an accumulation group.

        >>> import torch, torch.nn as nn
        >>> heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
        >>> model = nn.ModuleDict({"backbone": nn.Linear(2, 4), "heads": heads})
        >>> monitor = ConflictMonitor(model, shared=model.backbone)
        >>> h = model.backbone(torch.randn(8, 2))
        >>> report = monitor.backward({"a": heads["a"](h).mean(), "b": heads["b"](h).mean()}, weights=[1.0, 0.5])
        >>> report.weights.tolist(), model.backbone.weight.grad is not None
        ([1.0, 0.5], True)
        >>> monitor.close()
        """
        self._check_open()
        batch = task_losses(losses, weights_by_task(losses, weights))
        ids = self._sample_ids(sample_ids)
        if backward_fn is not None and weighting is not None:
            raise ValueError(
                "weighting= routes each task's gradient through the monitor's own backward; it cannot be combined "
                "with backward_fn= (a framework's own backward)"
            )
        self._weighting.select(weighting, self.accumulation_steps)
        write = backward_fn or functools.partial(write_grads, batch, self._scaling, self._weighting, self._planner)
        report = None
        if self.accumulation_steps > 1:
            tapped = isinstance(self.engine, TappedEngine) and self.engine.capture.armed
            if not self._micro.add(batch, self.step, self.step % self.every == 0, write, ids, tapped):
                return None
            report = self._micro.close(self.step)
        elif self.step % self.every != 0:
            write()
        else:
            report = self._measuring.step(batch, self.step, write, ids)
        self._advance()
        return report

    def measure(
        self,
        losses: Mapping[TaskKey, Tensor],
        weights: Mapping[TaskKey, object] | Sequence[object] | Tensor | None = None,
        *,
        weighting: WeightingSpec | None = None,
        sample_ids: Any = None,
    ) -> ConflictReport:
        """The same report as :meth:`backward`, leaving ``.grad`` untouched and the graph alive for your own
        backward. Counts as one step; with ``weighting``, the report's ``weights`` are the ones the method gives
        (``lambda_i w_i``) and the method's state advances as in :meth:`backward`."""
        self._check_open()
        batch = task_losses(losses, weights_by_task(losses, weights))
        ids = self._sample_ids(sample_ids)
        self._weighting.select(weighting, self.accumulation_steps)
        report = self._measuring.step(batch, self.step, None, ids)
        self._advance()
        return report

    def end_group(self) -> ConflictReport | None:
        """End the current group of micro-batches now, shorter than ``accumulation_steps``: the last group of an
        epoch whose length ``accumulation_steps`` does not divide, where the optimizer steps early. Returns the
        group's report (``None`` when the group was not measured, or when no group is open).

        >>> import torch, torch.nn as nn
        >>> model = nn.ModuleDict({"backbone": nn.Linear(2, 4), "heads": nn.ModuleDict(
        ...     {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})})
        >>> monitor = ConflictMonitor(model, shared=model.backbone, accumulation_steps=4)
        >>> h = model.backbone(torch.randn(8, 2))
        >>> monitor.backward({t: model.heads[t](h).mean() for t in "ab"}) is None
        True
        >>> report = monitor.end_group()       # the optimizer steps after one micro-batch
        >>> report.strategy, monitor.step, monitor.end_group()
        ('accumulated', 1, None)
        >>> monitor.close()
        """
        self._check_open()
        if self._micro.count == 0:
            return None
        report = self._micro.close(self.step)
        self._advance()
        return report

    def _sample_ids(self, ids: Any) -> Tensor | None:
        """The checked ``sample_ids`` (``None`` when not given); a set-up that cannot attribute raises here, before
        anything is computed."""
        if ids is None:
            return None
        if not isinstance(self.engine, TappedEngine):
            raise ValueError(
                f"sample_ids needs the default engine's per-layer pass; engine={self.engine.name!r} has none: use "
                "engine='auto' (exact) to attribute the Gram to examples"
            )
        sync = self._measuring.sync
        if self.accumulation_steps > 1 and sync is not None and sync.is_global:
            raise ValueError(
                f"sample_ids with accumulation_steps > 1 is not supported under sync={sync.mode!r} across "
                "processes: attribute single steps (accumulation_steps=1) there, or use sync='local'"
            )
        return sample_ids(ids)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this ConflictMonitor is closed; create a new one to measure again")

    def _taps_wanted(self) -> bool:
        # A measured group's micro-batches need taps only to be attributed to their examples, and cost about 10%
        # more with them on a small model: they are tapped until a measured group comes without sample_ids, and
        # again after one comes with them.
        if self.step % self.every != 0:
            return False
        return self.accumulation_steps == 1 or self._micro.attributed is not False

    def _advance(self) -> None:
        self.step += 1
        self.engine.arm(self._taps_wanted())

    # ------------------------------------------------------------------------------------------ diagnosis
    def advise(self, **kwargs: Any) -> Advice:
        """Diagnose this run: :func:`gradconflict.advise` on :attr:`history`, with this model (see its
        keyword arguments: probe batch, evaluations, thresholds, ...)."""
        from gradconflict.diagnosis import advise

        kwargs.setdefault("model", unwrap(self.model))
        return advise(self.history, **kwargs)

    # ------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove the taps, collect the history and close its sinks. The history stays readable; measuring
        again raises."""
        self._release()

    def __enter__(self) -> ConflictMonitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

