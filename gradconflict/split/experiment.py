"""The machinery of the comparison experiment behind :func:`~gradconflict.split.compare`: the recorded batches
replayed to every variant, the training, evaluation and cost measurement of each variant (``_Experiment``), and
the checks on the metrics and batches given."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradconflict.monitor import ConflictMonitor
from gradconflict.records.comparison import VariantRecord
from gradconflict.records.measures import Direction, check_direction
from gradconflict.split.costs import Timing, interleaved_ms, saved_activation_bytes, state_bytes
from gradconflict.split.model import count_parameters
from gradconflict.weighting import Weighting

LossFn = Callable[[Any, Any], Tensor]
MetricFn = Callable[[Any, Any], float]
#: ``{task: (fn, "max" | "min")}`` (one metric per task, named after it) or ``{task: {metric: (fn, direction)}}``.
MetricSpec = Mapping[str, tuple[MetricFn, str] | Mapping[str, tuple[MetricFn, str]]]
Batch = tuple[Any, Mapping[str, Any]]


@dataclass
class _Member:
    """One trained model of a variant (independent has one per task) and the tasks it serves."""

    model: nn.Module
    tasks: list[str]
    optimizer: torch.optim.Optimizer
    monitor: ConflictMonitor | None = None  # with a weighting: the monitor whose backward applies it
    weighting: Weighting | None = None


@dataclass
class _Run:
    """A variant's trajectory so far: per-step losses, evaluations and the memory of one step."""

    losses: dict[str, list[float]]
    evals: list[tuple[int, dict[str, dict[str, float]]]]
    memory_bytes: int = 0


@dataclass
class _Trained:
    """A variant at the end of its training: its members, its run and the step its own training began."""

    members: list[_Member]
    run: _Run
    start: int


def _to(value: Any, device: torch.device) -> Any:
    """Move the tensors in a (nested) batch to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _record_batches(data: Iterable[Batch], steps: int, tasks: Sequence[str]) -> list[Batch]:
    """The first ``steps`` batches of ``data``, cycling through it as often as needed."""
    batches: list[Batch] = []
    while len(batches) < steps:
        before = len(batches)
        for batch in data:
            batches.append(batch)
            if len(batches) == steps:
                break
        if len(batches) == before:
            again = " when iterated again" if batches else ""
            raise ValueError(
                f"train_data yielded no batch{again}: pass a re-iterable of (x, {{task: target}}) batches "
                "(a list or a DataLoader), not a one-shot iterator"
            )
    _check_batch(batches[0], tasks, "train_data")
    return batches


def _check_batch(batch: Any, tasks: Sequence[str], where: str) -> None:
    ok = isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Mapping)
    if not ok or any(t not in batch[1] for t in tasks):
        raise ValueError(f"{where} must yield (x, {{task: target}}) pairs with a target for each of {list(tasks)}")


def _batch_size(target: Any) -> int:
    return int(target.shape[0]) if isinstance(target, Tensor) and target.dim() > 0 else 1


class _Experiment:
    """The settings every variant shares, and the training and evaluation loops."""

    def __init__(
        self,
        loss_fns: Mapping[str, LossFn],
        batches: list[Batch],
        eval_batches: list[Batch],
        metrics: dict[str, dict[str, tuple[MetricFn, Direction]]],
        eval_steps: set[int],
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        device: torch.device,
        progress: bool,
    ) -> None:
        self.loss_fns = loss_fns
        self.tasks = list(loss_fns)
        self.batches = batches
        self.eval_batches = eval_batches
        self.metrics = metrics
        self.eval_steps = eval_steps
        self.optimizer_factory = optimizer_factory
        self.device = device
        self.progress = progress

    def member(self, model: nn.Module, tasks: Sequence[str]) -> _Member:
        params = [p for p in model.parameters() if p.requires_grad]
        return _Member(model, list(tasks), self.optimizer_factory(params))

    def train(
        self, name: str, members: list[_Member], run: _Run, start: int, stop: int, measure_memory: bool = True
    ) -> None:
        """Train ``members`` on batches ``start .. stop - 1``, appending to ``run``.

        With ``measure_memory``, the first step also measures the variant's training memory.
        """
        bar = _progress_bar(self.progress, stop - start, name)
        for step in range(start, stop):
            x, targets = self.batches[step]
            for member in members:
                measure = measure_memory and step == start
                if measure and self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                with saved_activation_bytes(member.model) if measure else nullcontext() as saved:
                    losses = self.step(member, x, targets)
                if measure:
                    assert saved is not None  # measure_memory: saved_activation_bytes ran
                    self._add_memory(run, member, saved.bytes)
                for task, loss in zip(member.tasks, losses):
                    run.losses[task].append(float(loss.detach()))
            if step + 1 in self.eval_steps:
                run.evals.append((step + 1, self.evaluate(members)))
            bar.update(1)
        bar.close()

    def step(self, member: _Member, x: Any, targets: Mapping[str, Any]) -> list[Tensor]:
        """One training step of ``member`` on one batch; its tasks' losses."""
        out = member.model(x)
        losses = [self.loss_fns[t](out[t], targets[t]) for t in member.tasks]
        member.optimizer.zero_grad(set_to_none=True)
        if member.monitor is None:
            torch.stack(losses).sum().backward()
        else:
            member.monitor.backward(dict(zip(member.tasks, losses)), weighting=member.weighting)
        member.optimizer.step()
        return losses

    def _add_memory(self, run: _Run, member: _Member, activations: int) -> None:
        if self.device.type == "cuda":
            # the allocator's peak already holds every member resident on the device: take the largest
            run.memory_bytes = max(run.memory_bytes, int(torch.cuda.max_memory_allocated(self.device)))
        else:
            run.memory_bytes += state_bytes(member.model, member.optimizer) + activations

    def evaluate(self, members: list[_Member]) -> dict[str, dict[str, float]]:
        """Each task's metrics, averaged over the evaluation batches (weighted by batch size)."""
        totals = {t: dict.fromkeys(self.metrics[t], 0.0) for t in self.tasks}
        seen = dict.fromkeys(self.tasks, 0)
        for member in members:
            was_training = member.model.training
            member.model.eval()
            with torch.no_grad():
                for x, targets in self.eval_batches:
                    out = member.model(x)
                    for task in member.tasks:
                        n = _batch_size(targets[task])
                        for name, (fn, _) in self.metrics[task].items():
                            totals[task][name] += float(fn(out[task], targets[task])) * n
                        seen[task] += n
            member.model.train(was_training)
        return {t: {k: v / seen[t] for k, v in totals[t].items()} for t in self.tasks}

    def costs(self, trained: Mapping[str, _Trained], repeats: int) -> dict[str, tuple[Timing, Timing]]:
        """Each variant's training step and inference call (all its members, all tasks), timed round-robin over
        the variants after every variant has trained: ``{variant: (step timing, inference timing)}``.

        The timed steps train the members further; their records are closed by then."""
        x, targets = self.batches[-1]
        probe = self.eval_batches[0][0]

        def train_step(members: list[_Member]) -> None:
            for member in members:
                self.step(member, x, targets)

        def infer(members: list[_Member]) -> None:
            with torch.no_grad():
                for member in members:
                    member.model(probe)

        steps = interleaved_ms(
            {name: functools.partial(train_step, t.members) for name, t in trained.items()}, repeats, self.device
        )
        modes = [(m, m.training) for t in trained.values() for member in t.members for m in member.model.modules()]
        for t in trained.values():
            for member in t.members:
                member.model.eval()
        try:
            calls = interleaved_ms(
                {name: functools.partial(infer, t.members) for name, t in trained.items()}, repeats, self.device
            )
        finally:
            for module, training in modes:
                module.training = training
        return {name: (steps[name], calls[name]) for name in trained}

    def record(self, name: str, trained: _Trained, step: Timing, call: Timing) -> VariantRecord:
        """Close a variant's run: its losses, evaluations and costs."""
        members, run = trained.members, trained.run
        return VariantRecord(
            name=name,
            losses=run.losses,
            evals=run.evals,
            directions={t: {k: d for k, (_, d) in self.metrics[t].items()} for t in self.tasks},
            params=sum(count_parameters(m.model, m.tasks) for m in members),
            step_ms=step.wall,
            latency_ms=call.wall,
            memory_mb=run.memory_bytes / 2**20,
            start=trained.start,
            step_cpu_ms=step.cpu,
            latency_cpu_ms=call.cpu,
        )


class _NoBar:
    def update(self, n: int) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


def _progress_bar(enabled: bool, total: int, name: str) -> Any:
    """A tqdm bar when asked for and tqdm is installed; otherwise a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc=f"compare: {name}", leave=False, disable=None)  # None: only on a terminal
    return _NoBar()


def _metric_spec(
    metrics: MetricSpec | None, loss_fns: Mapping[str, LossFn]
) -> dict[str, dict[str, tuple[Any, Direction]]]:
    """``{task: {metric: (fn, direction)}}`` from either form (default: each task's loss, ``"min"``)."""
    if metrics is None:
        return {t: {"loss": (fn, "min")} for t, fn in loss_fns.items()}
    missing = [t for t in loss_fns if t not in metrics]
    if missing:
        raise ValueError(f"metrics= gives no metric for tasks {missing}: give {{task: (fn, 'max' | 'min')}} for each")
    spec: dict[str, dict[str, tuple[Any, Direction]]] = {}
    for task in loss_fns:
        given = metrics[task]
        named = dict(given) if isinstance(given, Mapping) else {task: given}
        if not named:
            raise ValueError(f"metrics[{task!r}] is empty: give at least one (fn, 'max' | 'min')")
        spec[task] = {}
        for name, pair in named.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[0])):
                raise ValueError(f"metric {name!r} of task {task!r} must be (fn, 'max' | 'min'), got {pair!r}")
            spec[task][name] = (pair[0], check_direction(pair[1], f"metric {name!r} of task {task!r}"))
    return spec
