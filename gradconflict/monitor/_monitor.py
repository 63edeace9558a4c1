"""``ConflictMonitor``: attach to a multi-task model, replace ``loss.backward()``, get a report per step.

The monitor only schedules: its engine measures the per-task Gram, and ``.grad`` is written by autograd's own
backward of ``sum_i w_i L_i``, so tensor hooks, post-accumulate hooks, DDP's reducer, GradScaler and gradient
accumulation behave exactly as in a loop without the monitor.

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

import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from gradconflict.measure.attribution import sample_ids
from gradconflict.measure.checkpoint import BufferGuard
from gradconflict.measure.distributed import Sync
from gradconflict.measure.engine import ENGINES, Engine, Measurement, Plan, TappedEngine, make_engine
from gradconflict.measure.engine.base import Accumulator, measuring
from gradconflict.measure.report import ConflictReport, LayerReport
from gradconflict.measure.shared import SharedParameters, gram_dtype, layer_names
from gradconflict.measure.tasks import TaskLosses, task_losses
from gradconflict.records.history import History, Sink
from gradconflict.weighting import StepWeights, WeightingSpec

if TYPE_CHECKING:
    from gradconflict.diagnosis import Advice

__all__ = ["ConflictMonitor", "MeasurementWarning"]

OnNonFinite = Literal["raise", "skip", "propagate"]

#: Version of :meth:`ConflictMonitor.state_dict`.
STATE_SCHEMA = 1


class MeasurementWarning(RuntimeWarning):
    """A step could not be measured because of an error inside gradconflict; it was trained as usual (``.grad``
    as a plain backward gives) and is recorded as skipped."""


# Monitors alive now: token -> (the model, the ids of its modules). A second monitor on the same modules is refused
# unless asked for, because each one's backward frees the graph the other needs.
_ACTIVE: dict[int, tuple[weakref.ref[nn.Module], frozenset[int]]] = {}


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a data-parallel or ``torch.compile`` wrapper holds (its parameter names then carry no
    ``module.`` or ``_orig_mod.`` prefix)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _shut(token: int, engine: Engine, history: History) -> None:
    _ACTIVE.pop(token, None)
    engine.close()
    history.close()


def _graph_freed(err: BaseException) -> bool:
    text = str(err)
    return "second time" in text or "have already been freed" in text


_FREED = (
    "the graph of these losses was already freed by a backward pass (another monitor, or your own .backward()): "
    "call monitor.backward(losses) instead of loss.backward(), or monitor.measure(losses) before your own backward"
)


@dataclass
class _Accumulated:
    """The per-task gradients of the current logical step, summed over its micro-batches, keyed by task name."""

    grads: dict[str, dict[int, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    plan: Plan | None = None
    skip: str = ""


class ConflictMonitor:
    """Measures the per-task gradients of a multi-task model on its shared parameters at each step.

    Args:
        model: the whole model (backbone and heads), or a ``DistributedDataParallel`` wrapping it. Nothing is
            stored on it: the taps are a global forward hook acting on its modules only, removed by :meth:`close`
            (or leaving a ``with`` block, or when the monitor is garbage-collected).
        shared: the shared parameters: a module (its parameters that require grad, read at each step), an
            iterable of parameters, or ``None`` to discover them at the first step that carries two or more tasks,
            as the parameters that receive gradient from two or more of them.
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
            Gram is measured on the scaled losses and reported unscaled.
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
            :attr:`plan`). Every strategy is exact.
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
        threshold: float = 0.0,
        on_nonfinite: OnNonFinite = "raise",
        ema_decay: float = 0.9,
        max_history: int | None = 10_000,
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("every", every), ("accumulation_steps", accumulation_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
        self._sync = Sync.resolve(model, sync, process_group, sketch_size)
        if self._sync is not None and sinks_rank is not None and self._sync.rank != sinks_rank:
            sinks = ()  # one rank writes the files and dashboards
        self.model = model
        inner = _unwrap(model)
        ids = frozenset(id(m) for m in inner.modules())
        if not allow_other_monitors:
            for other, other_ids in list(_ACTIVE.values()):
                if other() is not None and ids & other_ids:
                    raise ValueError(
                        "another ConflictMonitor is attached to this model: close() it first (or use `with`), or pass "
                        "allow_other_monitors=True to both measure it (each monitor's backward frees the graph)"
                    )
        self._shared = SharedParameters(inner, shared)
        options = (
            {"strategy": strategy, "loop_memory": loop_memory, "math_attention": math_attention}
            if engine == "auto"
            else {}
        )
        self.engine: Engine = make_engine(engine, inner, shared if isinstance(shared, nn.Module) else None, **options)
        self.history = History(ema_decay=ema_decay, max_history=max_history, sinks=sinks)
        self.every = every
        self.threshold = float(threshold)
        self.on_nonfinite = on_nonfinite
        self.accumulation_steps = accumulation_steps
        self.scaler = scaler
        self.step = start_step
        self._micro = 0
        self._accumulated: _Accumulated | None = None
        self._layer_of, self._module_name = layer_names(inner)
        self._plan: Plan | None = None
        self._buffers = BufferGuard(inner)
        self._weighting = StepWeights()
        token = id(self)
        _ACTIVE[token] = (weakref.ref(inner), ids)
        self._release = weakref.finalize(self, _shut, token, self.engine, self.history)
        self.engine.arm(self._taps_wanted())

    # ------------------------------------------------------------------------------------------ state
    @property
    def shared_parameters(self) -> list[str]:
        """Names of the shared parameters (empty until discovered at a step with two or more tasks)."""
        return self._shared.state() if self._shared.module is None else [
            self._shared.names[id(p)] for p in self._shared.module.parameters() if p.requires_grad
        ]

    @property
    def plan(self) -> dict[str, Any]:
        """How the engine measures: its strategy setting and, per shape of step (number of tasks, tapped layers'
        input shapes), the strategy chosen, each candidate's best time over its trial steps, and how many it ran.

        >>> import torch.nn as nn
        >>> ConflictMonitor(nn.Linear(2, 2), engine="reference").plan
        {'engine': 'reference', 'strategy': 'loop', 'choices': []}
        """
        return {
            "engine": self.engine.name,
            "strategy": getattr(self.engine, "strategy", "loop" if self.engine.name == "reference" else "batched"),
            "choices": self.engine.state_dict() if hasattr(self.engine, "state_dict") else [],
        }

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._release.alive

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the step count, the shared parameters, the history (with its averages), the
        weighting's state (its random generator or warm start, and the last weights) and the engine's strategy
        choices (so that they are not timed again).

        Plain Python values and CPU tensors: save it with ``torch.save`` next to the model's checkpoint.
        """
        return {
            "schema": STATE_SCHEMA,
            "step": self.step,
            "shared": self.shared_parameters,
            "history": self.history.state_dict(),
            "weighting": self._weighting.state_dict(),
            "strategy_choices": self.plan["choices"],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a micro-batch group in progress is dropped)."""
        self._check_open()
        if state.get("schema") != STATE_SCHEMA:
            raise ValueError(f"not a ConflictMonitor state (schema {state.get('schema')!r}, expected {STATE_SCHEMA})")
        self._shared.load(state["shared"])
        self.history.load_state_dict(state["history"])
        self._weighting.load_state_dict(state.get("weighting", {}))
        if hasattr(self.engine, "load_state_dict"):
            self.engine.load_state_dict(state.get("strategy_choices", []))
        self.step = int(state["step"])
        self._micro, self._accumulated, self._plan = 0, None, None
        self.engine.arm(self._taps_wanted())

    # ------------------------------------------------------------------------------------------ steps
    def backward(
        self,
        losses: Mapping[Hashable, Tensor],
        weights: Mapping[Hashable, object] | None = None,
        *,
        backward_fn: Callable[[], object] | None = None,
        weighting: WeightingSpec | None = None,
        sample_ids: Any = None,
    ) -> ConflictReport | None:
        """Replace ``(sum_i w_i L_i).backward()``: measure the step, then let autograd fill ``.grad`` as it would.

        ``losses`` maps task names to scalar losses; ``weights`` (default 1 each) maps the same names to numbers or
        scalar tensors (a tensor that requires grad receives its gradient, like a learned task weight).

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

        Returns this step's :class:`~gradconflict.ConflictReport`; ``None`` on a step that ``every`` leaves
        unmeasured (a plain backward) and on every micro-batch but the last of an accumulation group.
        """
        self._check_open()
        batch = task_losses(losses, weights)
        ids = self._sample_ids(sample_ids)
        if backward_fn is not None and weighting is not None:
            raise ValueError(
                "weighting= routes each task's gradient through the monitor's own backward; it cannot be combined "
                "with backward_fn= (a framework's own backward)"
            )
        self._weighting.select(weighting, self.accumulation_steps)
        write = backward_fn or (lambda: self._write_grads(batch))
        if self.accumulation_steps > 1:
            return self._micro_batch(batch, write)
        if self.step % self.every != 0:
            write()
            self._advance()
            return None
        report = self._measured(batch, write, ids)
        self._advance()
        return report

    def measure(
        self,
        losses: Mapping[Hashable, Tensor],
        weights: Mapping[Hashable, object] | None = None,
        *,
        weighting: WeightingSpec | None = None,
        sample_ids: Any = None,
    ) -> ConflictReport:
        """The same report as :meth:`backward`, leaving ``.grad`` untouched and the graph alive for your own
        backward. Counts as one step; with ``weighting``, the report's ``weights`` are the ones the method gives
        (``lambda_i w_i``) and the method's state advances as in :meth:`backward`; ``sample_ids`` as in
        :meth:`backward`."""
        self._check_open()
        batch = task_losses(losses, weights)
        ids = self._sample_ids(sample_ids)
        self._weighting.select(weighting, self.accumulation_steps)
        report = self._measured(batch, None, ids)
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
        if self._micro == 0:
            return None
        self._micro = 0
        report = self._close_group() if self._accumulated is not None else None
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
        if self.accumulation_steps > 1:
            raise ValueError(
                "sample_ids is not supported with accumulation_steps > 1 yet: attribute single steps "
                "(accumulation_steps=1), or call without sample_ids"
            )
        if self._sync is not None and self._sync.is_global:
            raise ValueError(
                f"sample_ids is not supported with sync={self._sync.mode!r} across processes yet: with "
                "sync='local' each rank attributes its own examples against its own batch's gradients"
            )
        return sample_ids(ids)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this ConflictMonitor is closed; create a new one to measure again")

    def _taps_wanted(self) -> bool:
        # Micro-batches are measured by materialised per-task gradients, which need no tap.
        return self.accumulation_steps == 1 and self.step % self.every == 0

    def _advance(self) -> None:
        self.step += 1
        self.engine.arm(self._taps_wanted())

    def _write_grads(self, batch: TaskLosses) -> None:
        """``.grad`` by autograd's own backward of ``sum_i w_i L_i`` (scaled by the GradScaler, if any), the shared
        part of each task's gradient scaled by the weighting's ``lambda_i`` when one is active."""

        def run(total: Tensor) -> None:
            (total if self.scaler is None else self.scaler.scale(total)).backward()

        try:
            shared = None if self._plan is None else self._plan.shared
            self._weighting.backward(batch, run, shared, self._shared.names)
        except RuntimeError as err:
            if _graph_freed(err):
                raise RuntimeError(_FREED) from err
            raise

    def _roots(self, batch: TaskLosses) -> list[Tensor]:
        """The losses the engine differentiates: scaled like the training loss when a GradScaler is used."""
        return batch.losses if self.scaler is None else [self.scaler.scale(loss) for loss in batch.losses]

    def _unscale(self, value: Tensor, power: int) -> Tensor:
        if self.scaler is None:
            return value
        scale = self.scaler.scale(torch.ones((), device=value.device)).to(value.dtype)
        return value / scale**power

    def _plan_for(self, batch: TaskLosses) -> Plan | str:
        """This step's plan, or why it cannot be measured."""
        shared = self._shared.resolve(batch.names, batch.losses)
        if shared is None:
            return "the shared parameters are found at the first step that carries two or more tasks"
        if not shared:
            return "no shared parameter requires grad (is the backbone frozen?)"
        copies = self._shared.leaves(shared)  # FSDP2: the graph holds unsharded copies of the parameters
        ids = {id(p) for p in shared} | {id(c) for c in copies.values()}
        if self._plan is None or self._plan.shared != ids:
            layer_of = self._layer_of | {id(c): self._layer_of[k] for k, c in copies.items() if k in self._layer_of}
            self._plan = Plan(ids, layer_of, self._module_name, gram_dtype(shared), _unwrap(self.model), copies)
            self.engine.restrict(ids)
        self._shared.check_dependence(batch.names, batch.losses, shared)
        return self._plan

    def _engine_call(self, run: Any) -> Any:
        """Run an engine call; an error inside gradconflict becomes a warning and a skipped step, never a crash."""
        try:
            with self._buffers, measuring():
                result = run()
        except (ValueError, TypeError):
            raise
        except RuntimeError as err:
            if _graph_freed(err):
                raise RuntimeError(_FREED) from err
            if self._sync is not None and self._sync.is_global:
                raise
            return self._failed(err)
        except Exception as err:  # the training run must go on ...
            if self._sync is not None and self._sync.is_global:
                raise  # ... but a rank that stopped measuring would leave the others waiting in a collective
            return self._failed(err)
        return result

    def _failed(self, err: BaseException) -> str:
        reason = f"measurement failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(
            f"gradconflict: {reason}; the step was trained as usual and is recorded as skipped",
            MeasurementWarning,
            stacklevel=4,
        )
        return reason

    def _nonfinite(self, batch: TaskLosses, norms: Tensor | None) -> tuple[list[str], list[str]]:
        """The tasks whose loss, and those whose gradient (``norms``: the Gram's diagonal), are not finite; device
        weights that are negative or not finite raise ``ValueError``. One host sync."""
        T = len(batch.names)
        parts = [torch.isfinite(batch.loss_vector())]
        if norms is not None:
            parts.append(torch.isfinite(norms).to(parts[0].device))
        device_weights = batch.device_weights
        if device_weights:
            w = torch.stack([x.detach() for x in device_weights])
            parts.append((torch.isfinite(w) & (w >= 0)).to(parts[0].device))
        flags = torch.cat(parts)
        if self._sync is not None:
            flags = self._sync.all_true(flags)  # every rank takes the same decision
        flags = flags.tolist()
        if device_weights and not all(flags[-len(device_weights) :]):
            raise ValueError("a task weight tensor is negative or not finite; weights must be finite and >= 0")
        bad_loss = [n for n, ok in zip(batch.names, flags[:T]) if not ok]
        bad_grad = [n for n, ok in zip(batch.names, flags[T : 2 * T]) if not ok] if norms is not None else []
        return bad_loss, bad_grad

    def _verdict(self, step: int, bad_loss: list[str], bad_grad: list[str], write: bool) -> tuple[str, bool]:
        """``(skip reason, write .grad)`` for a checked step; raises ``FloatingPointError`` under "raise"."""
        if bad_loss:
            what = f"non-finite loss for task(s) {bad_loss}"
        elif bad_grad and self.scaler is not None and write:
            # The scaler must see the overflow in .grad to skip its step and lower its scale.
            return f"gradient overflow for task(s) {bad_grad}: the GradScaler skips this step", True
        elif bad_grad:
            what = f"non-finite gradient for task(s) {bad_grad}"
        else:
            return "", write
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{what} at step {step}; nothing was written to .grad. Pass on_nonfinite='skip' to skip such steps"
            )
        return what, False

    def _global_losses(self, losses: Tensor) -> Tensor:
        """The losses a global report shows: their mean over the ranks, so that every rank reports alike."""
        return losses if self._sync is None or not self._sync.is_global else self._sync.mean(losses)

    def _report(
        self, names: tuple[str, ...], measurement: Measurement, weights: Tensor, losses: Tensor, step: int,
        ids: Tensor | None = None,
    ) -> ConflictReport:
        layers = {
            name: LayerReport(
                name, names, entry.gram, weights, num_params=entry.num_params, route=entry.route,
                threshold=self.threshold,
            )
            for name, entry in measurement.layers.items()
        }
        report = ConflictReport(
            names,
            measurement.gram,
            weights,
            losses=losses,
            layers=layers,
            step=step,
            engine=self.engine.name,
            strategy=measurement.strategy,
            approximate=self.engine.approximate,
            threshold=self.threshold,
            sync="" if self._sync is None else self._sync.mode,
        )
        if ids is not None and measurement.samples is not None:
            samples = measurement.samples.result(ids, names)
            # under a GradScaler the losses were scaled: so is every inner product, by the scale's square
            report.samples = samples.scaled(self._unscale(samples.gram.new_ones(()), 2))
        self.history.append(report)
        return report

    def _skipped(
        self, names: tuple[str, ...], step: int, reason: str, losses: Tensor, weights: Tensor
    ) -> ConflictReport:
        report = ConflictReport.skipped_step(names, step, reason, losses, self.engine.name, weights)
        self.history.append(report)
        return report

    def _measured(
        self, batch: TaskLosses, write: Callable[[], object] | None, ids: Tensor | None = None
    ) -> ConflictReport:
        """Measure one step, then write ``.grad`` (``write``, if any) unless the step is skipped or raised."""
        step, losses, weights = self.step, batch.loss_vector(), batch.weight_vector()
        plan = self._plan_for(batch)
        if isinstance(plan, str):
            if write is not None:
                write()
            return self._skipped(batch.names, step, plan, losses, self._weighting.effective(batch))
        reduction = None if self._sync is None else self._sync.reduction(step)
        if ids is None:
            outcome = self._engine_call(lambda: self.engine.measure(self._roots(batch), plan, reduction))
        else:
            engine = cast(TappedEngine, self.engine)  # _sample_ids checked it
            outcome = self._engine_call(lambda: engine.attribute(self._roots(batch), plan, len(ids)))
        if isinstance(outcome, str):
            if write is not None:
                write()
            return self._skipped(batch.names, step, outcome, losses, self._weighting.effective(batch))
        measurement: Measurement = outcome
        measurement.gram = self._unscale(measurement.gram, 2)
        for entry in measurement.layers.values():
            entry.gram = self._unscale(entry.gram, 2)
        reason = ""
        if self.on_nonfinite != "propagate":
            bad_loss, bad_grad = self._nonfinite(batch, measurement.gram.diagonal())
            reason, keep = self._verdict(step, bad_loss, bad_grad, write is not None)
            write = write if keep else None
        # the weighting's lambda from this step's Gram, before the backward that applies it
        weights = self._weighting.effective(batch) if reason else self._weighting.update(batch, measurement.gram)
        if write is not None:
            write()
        if reason:
            return self._skipped(batch.names, step, reason, losses, weights)
        return self._report(batch.names, measurement, weights, self._global_losses(losses), step, ids)

    # ------------------------------------------------------------------------------------------ micro-batches
    def _micro_batch(self, batch: TaskLosses, write: Callable[[], object]) -> ConflictReport | None:
        measured = self.step % self.every == 0
        if measured:
            if self._accumulated is None:
                self._accumulated = _Accumulated()
            self._accumulate(batch, self._accumulated, write)
        else:
            write()
        self._micro += 1
        if self._micro < self.accumulation_steps:
            return None
        self._micro = 0
        report = self._close_group() if measured else None
        self._advance()
        return report

    def _accumulate(self, batch: TaskLosses, acc: _Accumulated, write: Callable[[], object]) -> None:
        """Add one micro-batch's per-task gradients to the group, then write its ``.grad``."""
        keep = True
        weights = batch.weight_vector()
        for t, (name, loss) in enumerate(zip(batch.names, batch.loss_vector())):
            acc.losses[name] = acc.losses[name] + loss if name in acc.losses else loss
            acc.weights[name] = weights[t].to(loss.device)
        plan = self._plan_for(batch) if not acc.skip else acc.skip
        if isinstance(plan, str):
            acc.skip = acc.skip or plan
        else:
            acc.plan = plan
            outcome = self._engine_call(lambda: self.engine.gradients(self._roots(batch), plan))
            if isinstance(outcome, str):
                acc.skip = outcome
            else:
                grads = {k: (leaf, self._unscale(g, 1)) for k, (leaf, g) in outcome.items()}
                if self.on_nonfinite != "propagate":
                    norms = sum(g.flatten(1).pow(2).sum(1) for _, g in grads.values())
                    bad_loss, bad_grad = self._nonfinite(batch, norms if grads else None)
                    reason, keep = self._verdict(self.step, bad_loss, bad_grad, True)
                    acc.skip = acc.skip or reason
                for t, name in enumerate(batch.names):
                    sums = acc.grads.setdefault(name, {})
                    for k, (leaf, g) in grads.items():
                        sums[k] = (leaf, sums[k][1] + g[t] if k in sums else g[t])
        if keep:
            write()

    def _close_group(self) -> ConflictReport:
        acc, self._accumulated = self._accumulated, None
        assert acc is not None
        names = tuple(acc.losses)
        losses = torch.stack([acc.losses[n] for n in names])
        weights = torch.stack([acc.weights[n] for n in names])
        if acc.skip or acc.plan is None:
            return self._skipped(names, self.step, acc.skip or "nothing measured", losses, weights)
        leaves: dict[int, Tensor] = {}
        for sums in acc.grads.values():
            leaves.update((k, leaf) for k, (leaf, _) in sums.items())
        reduction = None if self._sync is None else self._sync.reduction(self.step)
        total = Accumulator(len(names), acc.plan, losses.device, reduction)
        for k, leaf in leaves.items():
            rows = [acc.grads.get(n, {}).get(k) for n in names]
            zero = next(r[1] for r in rows if r is not None).new_zeros(leaf.shape)
            total.add_per_task(leaf, torch.stack([zero if r is None else r[1] for r in rows]))
        return self._report(names, total.result("accumulated"), weights, self._global_losses(losses), self.step)

    # ------------------------------------------------------------------------------------------ diagnosis
    def advise(self, **kwargs: Any) -> Advice:
        """Diagnose this run: :func:`gradconflict.advise` on :attr:`history`, with this model (see its
        keyword arguments: probe batch, evaluations, thresholds, ...)."""
        from gradconflict.diagnosis import advise

        kwargs.setdefault("model", _unwrap(self.model))
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

