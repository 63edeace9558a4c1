"""The default engine (``engine="auto"``): one vectorised VJP over the T task losses.

``torch.func.vmap`` over ``torch.autograd.grad`` runs one backward for all T tasks at once. Each tapped module
receives its ``[T, ...]`` output gradients as the backward reaches it; its layer rule turns them into the layer's
Gram, and they are dropped at once (with the inputs the tap recorded). Shared parameters that no rule covers are
materialised (T gradients each) and their Gram taken. Nothing is written to ``.grad``: the monitor lets autograd
do that afterwards.

Where the batched backward cannot run (a ``torch.compile``'d region, or a torch op whose batched backward fails),
the engine measures with the per-task loop instead, exactly, and warns once.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradconflict.measure.attribution import Attributor, HeldLayer
from gradconflict.measure.capture import Capture, RetainedGrads
from gradconflict.measure.checkpoint import measuring_segments
from gradconflict.measure.engine.base import Accumulator, Measurement, MeasurementRefused, Plan, warn_once
from gradconflict.measure.engine.batched import BatchedPass, Inexact, TaskByTask
from gradconflict.measure.engine.loop import loop_accumulate
from gradconflict.measure.engine.segments import boundary_edges, segment_backward
from gradconflict.measure.graph import Graph, walk_graph
from gradconflict.measure.rules.base import Scratch

if TYPE_CHECKING:
    from gradconflict.measure.distributed import Reduction

__all__ = ["STRATEGIES", "Choice", "TappedEngine"]

_FALLBACK = re.compile(r"batching rule for (\S+?)\.? ")


_NOT_COVERED = (
    "no layer rule covers it here (a raw parameter, attention's packed projection, a tied or hooked weight): its "
    "per-example gradients are not known in the measured pass"
)

#: The strategies ``ConflictMonitor(strategy=...)`` accepts.
STRATEGIES: tuple[str, ...] = ("auto", "batched", "loop")


#: Trial steps per candidate strategy. The first run of each pays the process's cold start (allocations, kernel
#: set-up: a CNN's first batched step takes about 10 times its later ones on CPU), so each candidate is judged by
#: its faster run.
TRIALS = 2


@dataclass
class Choice:
    """The strategy measured fastest for one shape of step (T tasks, the tapped calls' input shapes, whether the
    step is attributed to its examples).

    Attributes:
        strategy: ``"batched"`` or ``"loop"``, or ``None`` while the candidates are still being timed.
        seconds: each candidate's best time over its trial steps so far.
        runs: each candidate's trial steps so far.
    """

    strategy: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)


def _shape(saved: Any) -> tuple[int, ...]:
    saved = saved[0] if isinstance(saved, tuple) else saved
    return tuple(saved.shape) if isinstance(saved, Tensor) else ()


class TappedEngine:
    """The default engine: taps, one vectorised VJP, per-layer rules; or a per-task loop where that is faster.

    With ``strategy="auto"``, the first measured steps of each new shape (number of tasks, tapped layers' input
    shapes) alternate between the batched pass and the per-task loop, each timed on ``TRIALS`` steps, and the
    one with the faster best run is kept for that shape (like ``cudnn.benchmark``). The loop is a candidate only
    when its T copies of the shared gradients fit in ``loop_memory`` bytes. Both are exact; :attr:`choices`
    records what was chosen and why. Across processes (a global reduction), every rank makes the same choice,
    one per number of tasks (see :meth:`_choose`). Steps attributed to their examples (:meth:`attribute`) choose
    apart, between the batched pass and a per-task loop whose taps report each task's output gradients.
    """

    name = "auto"
    approximate = False

    def __init__(
        self, model: nn.Module, strategy: str = "auto", loop_memory: int = 512 * 2**20, math_attention: bool = False
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        self.capture = Capture(model, math_attention)
        self.retained = RetainedGrads()
        self.strategy = strategy
        self.loop_memory = loop_memory
        self.choices: dict[tuple[Any, ...], Choice] = {}
        self._warned: set[str] = set()
        self._loop_reason: str | None = None
        self._opaque = False  # the model runs compiled: taps would never fire inside it
        # the attributed steps' per-example gradients (at most EXAMPLE_CHUNK_BYTES), formed where the last step's lay
        self._scratch = Scratch()

    def state_dict(self) -> list[dict[str, Any]]:
        """The strategy choices made so far (plain data), so that a resumed run does not time them again."""
        return [
            {
                "tasks": key[0], "shapes": [list(s) for s in key[1]], "attributed": key[2], "strategy": c.strategy,
                "seconds": dict(c.seconds), "runs": dict(c.runs),
            }
            for key, c in self.choices.items()
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Restore :meth:`state_dict`."""
        self.choices = {
            (d["tasks"], tuple(tuple(s) for s in d["shapes"]), bool(d.get("attributed", False))): Choice(
                d["strategy"], dict(d["seconds"]), dict(d.get("runs", dict.fromkeys(d["seconds"], TRIALS)))
            )
            for d in state
        }

    def arm(self, on: bool) -> None:
        """Tap the coming forwards, or not (never with ``strategy="loop"``, which needs no tap; with ``"auto"``
        the taps stay, so that the step's shape, read from them, stays what its choice was made for)."""
        self.capture.arm(on and not self._opaque and self.strategy != "loop")

    def restrict(self, shared: set[int]) -> None:
        """Tap only the modules holding a shared parameter."""
        self.capture.restrict(shared)

    def close(self) -> None:
        """Remove the hook and free the attribution's scratch memory."""
        self.capture.close()
        self.retained.close()
        self._scratch = Scratch()

    def measure(self, losses: Sequence[Tensor], plan: Plan, reduction: Reduction | None = None) -> Measurement:
        """The per-layer Grams of one step; the graph stays alive for the backward that writes ``.grad``."""
        acc, strategy = self._run(losses, plan, cover=True, reduction=reduction)
        return acc.result(strategy)

    def gradients(self, losses: Sequence[Tensor], plan: Plan) -> dict[int, tuple[Tensor, Tensor]]:
        """Every shared parameter's per-task gradients from one batched backward (no layer rule)."""
        acc, _ = self._run(losses, plan, cover=False)
        return acc.gradients()

    def _run(
        self, losses: Sequence[Tensor], plan: Plan, cover: bool, reduction: Reduction | None = None
    ) -> tuple[Accumulator, str]:
        with self.retained.kept():
            return self._route(losses, plan, cover, reduction)

    def _route(
        self, losses: Sequence[Tensor], plan: Plan, cover: bool, reduction: Reduction | None
    ) -> tuple[Accumulator, str]:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        graph = walk_graph([stacked])
        reason = self._loop_reason
        if graph.opaque:
            reason = f"the graph holds {', '.join(sorted(graph.opaque))} (a torch.compile'd region)"
            self._opaque = True
            self.capture.arm(False)
        if reason is None:
            try:
                strategy, choice = self._choose(graph, plan, stacked, reduction)
                if strategy == "loop":
                    return self._timed(choice, "loop", lambda: loop_accumulate(losses, plan, graph, reduction))
                return self._timed(choice, "batched", lambda: self._batched(stacked, graph, plan, cover, reduction))
            except Inexact as err:
                reason = f"{err} is called in several checkpointed segments"
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                # a failed collective is no op's failure: the other ranks are not where this one would go on
                if "second time" in str(err) or "has been freed" in str(err) or isinstance(err, dist.DistError):
                    raise
                # A torch op whose batched backward fails (bf16 autocast through LayerNorm on CPU, in torch 2.13):
                # measure this run with the per-task loop, which runs the same backward one task at a time.
                reason = f"the batched backward failed in torch {torch.__version__} ({str(err).splitlines()[0]})"
                self._loop_reason = reason
        warn_once(
            self._warned,
            reason,
            f"gradconflict: {reason}; measuring with one backward per task instead (exact, slower, and it holds "
            "T copies of the shared gradients). To choose this from the start, pass strategy=\"loop\" to the "
            "ConflictMonitor; to pay for it less often, every=k",
        )
        # across processes, what a failed pass reduced is dropped: every rank failed alike and starts over
        fresh = None if reduction is None else reduction.restart()
        return loop_accumulate(losses, plan, graph, fresh), "loop"

    def _choose(
        self, graph: Graph, plan: Plan, stacked: Tensor, reduction: Reduction | None, attributed: bool = False
    ) -> tuple[str, Choice | None]:
        """The strategy for this step, and the :class:`Choice` to time it into while it is still on trial.

        Across processes (a ``reduction``), the two strategies run different collectives, so every rank must
        choose alike: the choice is one per number of tasks (the ranks' batches may differ in shape), its trial
        steps follow the same order on every rank, and it is settled on each candidate's slowest rank's time (one
        all-reduce of the candidates' times, on the step that settles it).

        Steps attributed to their examples (``attributed``) are chosen for apart: there the loop is
        :meth:`_task_by_task`, which also holds every tapped output's T gradients, within ``loop_memory``."""
        if self.strategy != "auto":
            return self.strategy, None
        T = stacked.shape[0]
        taps = self.capture.taps
        ours = [c for c in graph.calls if c.owner is self.capture and taps(c.module)]
        shapes = tuple(_shape(c.saved) for c in ours)
        choice = self.choices.setdefault((T, () if reduction is not None else shapes, attributed), Choice())
        if choice.strategy is not None:
            return choice.strategy, None
        # the graph's shared leaves: the same on every rank, as the reductions' collectives already require
        held = sum(t.numel() * t.element_size() for t in graph.leaves if id(t) in plan.shared)
        if attributed:
            held += sum(c.output_bytes for c in ours)
        candidates = ["batched", "loop"] if T * held <= self.loop_memory else ["batched"]
        pending = [c for c in candidates if choice.runs.get(c, 0) < TRIALS]
        if pending:  # the candidate with the fewest trial steps, batched first: they alternate
            return min(pending, key=lambda c: choice.runs.get(c, 0)), choice
        if reduction is not None:  # a data-parallel step waits for its slowest rank
            times = torch.tensor([choice.seconds[c] for c in candidates], dtype=torch.float64, device=stacked.device)
            choice.seconds = dict(zip(candidates, reduction.sync.largest(times).tolist()))
        choice.strategy = min(choice.seconds, key=choice.seconds.__getitem__)
        return choice.strategy, None

    @staticmethod
    def _timed(choice: Choice | None, strategy: str, run: Callable[[], Accumulator]) -> tuple[Accumulator, str]:
        """Run one strategy, timing it when its ``choice`` is on trial (with a device sync, on those steps only)."""
        if choice is None:
            return run(), strategy
        device_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        device_sync()
        start = time.perf_counter()
        acc = run()
        device_sync()
        elapsed = time.perf_counter() - start
        choice.seconds[strategy] = min(elapsed, choice.seconds.get(strategy, elapsed))
        choice.runs[strategy] = choice.runs.get(strategy, 0) + 1
        return acc, strategy

    def attribute(
        self, losses: Sequence[Tensor], plan: Plan, examples: int, reduction: Reduction | None = None
    ) -> Measurement:
        """:meth:`measure`, with each example's part in every rule-covered layer's Gram (dim 0 of the tapped
        inputs is the example): the measurement's ``samples`` is the :class:`Attributor` that collected it.
        The layer rules need every task's output gradients at each tapped layer: the batched pass gives them, or
        a per-task loop whose taps report each task's in turn (:meth:`_task_by_task`); with
        ``strategy="auto"`` the faster of the two for this shape of step, timed on its first attributed steps
        like the measurement's own choice (:meth:`_choose`), and kept apart from it. Checkpointed segments take
        the batched pass; so do several processes (an exact ``reduction``), where each of this rank's examples is
        attributed against the global per-task gradients, as its share of the global Gram."""
        if reduction is not None and reduction.sync.mode != "exact":
            raise MeasurementRefused(
                f"sample_ids needs the global per-task gradients, which sync={reduction.sync.mode!r} does not form: "
                "use sync='exact' (each example against the global gradients) or 'local' (against its rank's)"
            )
        stacked, graph = self._attributable(losses, examples)
        world = 1 if reduction is None else reduction.sync.world
        attribution = Attributor(
            examples, len(losses), plan.gram_dtype, stacked.device, self._names(plan), plan.leaf, world,
            self._scratch,
        )
        strategy, choice = "batched", None
        if reduction is None and not graph.checkpoints:
            strategy, choice = self._choose(graph, plan, stacked, None, attributed=True)
        with self.retained.kept():  # a retained activation's .grad stays what the user's backward makes it
            if strategy == "loop":
                acc, _ = self._timed(choice, "loop", lambda: self._task_by_task(losses, graph, plan, attribution))
            else:
                acc, _ = self._timed(
                    choice, "batched", lambda: self._batched(stacked, graph, plan, True, reduction, attribution)
                )
        attribution.omit([leaf for leaf, _ in acc.gradients().values()], _NOT_COVERED)
        measurement = acc.result(strategy)
        measurement.samples = attribution
        return measurement

    def hold(
        self, losses: Sequence[Tensor], plan: Plan, examples: int
    ) -> tuple[dict[int, tuple[Tensor, Tensor]], list[HeldLayer]]:
        """:meth:`gradients` for one micro-batch of an accumulation group attributed to its ``examples``
        examples: every shared parameter's per-task gradients, and each rule-covered module's calls (inputs and
        every task's output gradients) held, so that the group's end can attribute them against the group's
        per-task gradients (:meth:`attribute_held`). One batched backward; in one process."""
        stacked, graph = self._attributable(losses, examples)
        held: list[HeldLayer] = []
        with self.retained.kept():
            acc = self._batched(stacked, graph, plan, True, None, held=held)
        return acc.gradients(), held

    def attribute_held(
        self, parts: Sequence[tuple[int, list[HeldLayer]]], totals: dict[int, tuple[Tensor, Tensor]], plan: Plan
    ) -> Attributor:
        """The attribution of an accumulation group: ``parts`` holds each micro-batch's number of examples and
        held layers (:meth:`hold`), in order; ``totals`` the group's per-task gradients (parameter id ->
        ``(parameter, [T, *shape])``). Each example's contribution is taken against the group's gradients, so that
        the contributions of all the group's examples add up to the group's Gram."""
        blocks = {k: g for k, (_, g) in totals.items()}
        some = next(iter(blocks.values()))
        attribution = Attributor(
            sum(n for n, _ in parts), some.shape[0], plan.gram_dtype, some.device, self._names(plan), plan.leaf,
            scratch=self._scratch,
        )
        attribution.group(parts, blocks)
        covered = {
            id(plan.leaf(h.rule.params(h.module)[name])) for _, layers in parts for h in layers for name in h.names
        }
        attribution.omit([leaf for leaf, _ in totals.values() if id(leaf) not in covered], _NOT_COVERED)
        return attribution

    def _attributable(self, losses: Sequence[Tensor], examples: int) -> tuple[Tensor, Graph]:
        """The stacked losses and their graph, once checked that this step can be attributed to ``examples``
        examples (else :class:`MeasurementRefused`, naming what to change)."""
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        graph = walk_graph([stacked])
        if graph.opaque or self._opaque or self.strategy == "loop":
            why = "the model runs compiled (torch.compile)" if graph.opaque or self._opaque else "strategy='loop'"
            raise MeasurementRefused(
                f"sample_ids needs the batched pass's per-layer output gradients, and {why} leaves none: measure "
                "the uncompiled model with strategy='auto' or 'batched', or call without sample_ids"
            )
        ours = [c for c in graph.calls if c.owner is self.capture and c.saved is not None]
        rows = {(c.saved[0] if isinstance(c.saved, tuple) else c.saved).shape[0] for c in ours}
        if ours and examples not in rows:
            raise MeasurementRefused(
                f"sample_ids has {examples} ids, but no measured layer's input has {examples} rows along dim 0 "
                f"(they have {sorted(rows)}): pass one id per example of this batch"
            )
        return stacked, graph

    @staticmethod
    def _names(plan: Plan) -> dict[int, str]:
        """The shared layers' parameter names, keyed by the id of the tensor the graph holds."""
        return {
            id(plan.leaf(p)): f"{layer}.{n}" if layer else n
            for module, layer in plan.module_name.items()
            for n, p in module.named_parameters(recurse=False)
        }

    def _batched(
        self, stacked: Tensor, graph: Graph, plan: Plan, cover: bool, reduction: Reduction | None,
        attribution: Attributor | None = None, held: list[HeldLayer] | None = None,
    ) -> Accumulator:
        T = stacked.shape[0]
        current = BatchedPass(T, plan, self.capture, stacked.device, cover, reduction, attribution, held)
        try:
            inputs = current.begin(graph, set())
            edges = boundary_edges(graph.checkpoints)
            if inputs or edges:
                requested: list[Any] = [*inputs, *edges]

                def vjp(v: Tensor) -> tuple[Tensor, ...]:
                    return torch.autograd.grad(stacked, requested, v, retain_graph=True, materialize_grads=True)

                def handler(ctx: Any, grads: tuple[Tensor, ...]) -> tuple[Any, ...]:
                    return segment_backward(ctx, grads, current, capture=self.capture)

                self.capture.receiver = current
                with measuring_segments(handler) if edges else contextlib.nullcontext():
                    per_task = self._vmap(vjp, torch.eye(T, dtype=stacked.dtype, device=stacked.device))
                current.finish(inputs, per_task[: len(inputs)])
            return current
        finally:
            self.capture.receiver = None
            current.release()

    def _task_by_task(self, losses: Sequence[Tensor], graph: Graph, plan: Plan, attribution: Attributor) -> Accumulator:
        """The batched pass's work done with one backward per task: each task's backward asks autograd only for
        the anchors and the shared parameters no rule covers (as the batched backward does), the taps report each
        task's output gradients (held, T of each, until the last task has run: :meth:`_choose` weighs that memory),
        and the layer rules run on them then. One process, no checkpointed segment: the caller sends those to the
        batched pass."""
        current = BatchedPass(len(losses), plan, self.capture, losses[0].device, True, None, attribution)
        receiver = TaskByTask(current)
        try:
            inputs = current.begin(graph, set())
            self.capture.receiver = receiver
            for i, loss in enumerate(losses):
                receiver.task = i
                grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
                for leaf, g in zip(inputs, grads):
                    if not self.capture.is_anchor(leaf):
                        current.add_per_task(leaf, torch.zeros_like(leaf) if g is None else g, task=i)
            self.capture.receiver = None
            receiver.deliver()
            current.finish([], [])
            return current
        finally:
            self.capture.receiver = None
            current.release()

    def _vmap(self, fn: Callable[[Tensor], tuple[Tensor, ...]], eye: Tensor) -> tuple[Tensor, ...]:
        """``torch.func.vmap(fn)(eye)``, turning torch's per-op fallback warnings into one clear warning per op.

        An op without a batching rule makes vmap loop over the T tasks for that op: exact, but that layer then
        costs T backward passes. It must never happen silently.
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # "same": a checkpointed segment recomputed inside the pass draws its dropout masks once, as its forward did
            out = torch.func.vmap(fn, randomness="same")(eye)
        for w in caught:
            match = _FALLBACK.search(str(w.message))
            if match is None:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            else:
                warn_once(
                    self._warned,
                    match.group(1),
                    f"gradconflict: {match.group(1)} has no vmap batching rule in torch {torch.__version__}, so the "
                    f"batched backward loops over the {eye.shape[0]} tasks for it (exact, but slower). On CPU this "
                    "is the fused attention backward: pass math_attention=True to the ConflictMonitor (torch's math "
                    "attention kernel in the measured forwards) or measure less often (every=k)",
                )
        return out
