"""Step 1, the comparison experiment: train the split variants side by side at small scale and tabulate them.

The variants, all from the same initialisation (``torch.manual_seed(seed)`` before each model is built), with
the same step budget and exactly the same batches in the same order:

- ``shared``: one model, all tasks, the summed loss, for the whole budget.
- ``independent``: one copy of the model per task, each trained on its own loss alone for the whole budget.
- ``lora``: the shared model after ``split_fraction`` of the budget (default half), backbone frozen, then one
  LoRA adapter per task on every weight LoRA adapts (``lora_split(..., targets="all")``) and the heads, trained
  for the rest: the logical split at equal total budget.
- ``branched``: the same shared model at the same point, branched at ``branch_at`` into ``groups``, then every
  copy trained for the rest: the physical split at equal total budget.
- ``shared+<method>`` (one per entry of ``weightings=``): the shared model for the whole budget, each step's
  update made conflict-aware by that method (``ConflictMonitor.backward(..., weighting=method)``: see
  :mod:`gradconflict.weighting`). The cheaper answer to conflict: if it lifts the tasks as far as a split does,
  no split is needed.

Splitting a partly trained shared model (rather than training the split architectures from scratch) answers
the question a team asks, "should *this* model be split now?", and gives lora a trained backbone to adapt. The first
pass over ``train_data`` is recorded and replayed to every variant, so shuffling loaders cannot give the
variants different orders.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradconflict.monitor import ConflictMonitor
from gradconflict.records.comparison import ComparisonResult, VariantRecord
from gradconflict.records.measures import Direction, check_direction
from gradconflict.split.branch import branch
from gradconflict.split.costs import Timing, interleaved_ms, saved_activation_bytes, state_bytes
from gradconflict.split.lora import lora_split
from gradconflict.split.model import check_convention, count_parameters
from gradconflict.weighting import Weighting, WeightingSpec, make_weighting

__all__ = ["VARIANTS", "compare"]

VARIANTS = ("shared", "independent", "lora", "branched")

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


def compare(
    model_factory: Callable[[], nn.Module] | nn.Module,
    loss_fns: Mapping[str, LossFn],
    train_data: Iterable[Batch],
    steps: int = 200,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    eval_data: Iterable[Batch] | None = None,
    metrics: MetricSpec | None = None,
    branch_at: int | str | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
    variants: Sequence[str] = VARIANTS,
    progress: bool = True,
    *,
    split_fraction: float = 0.5,
    lora_rank: int = 8,
    evals: int = 5,
    blocks: Sequence[str] | None = None,
    weightings: Sequence[WeightingSpec] = (),
    cost_repeats: int = 9,
) -> ComparisonResult:
    """Run the comparison experiment (see the module docstring for what each variant is) and tabulate it.

    Args:
        model_factory: ``() -> model`` following the convention (``.backbone``, ``.heads``, ``forward(x)`` ->
            ``{task: output}``), or a model, deep-copied for every variant.
        loss_fns: task -> ``loss(output, target)``, a scalar tensor.
        train_data: a re-iterable of ``(x, {task: target})`` batches, cycled if shorter than ``steps``.
        steps: training steps per variant (the independent variant takes ``steps`` steps per task model).
        optimizer_factory: ``params -> optimizer``; default Adam with lr 1e-3. Lora and branched get a fresh
            optimizer when they split.
        eval_data: batches to evaluate on; default ``train_data`` (one pass).
        metrics: task -> ``(fn(output, target) -> float, "max" | "min")``, or task -> ``{name: (fn, direction)}``
            for several metrics per task; default each task's loss (named ``"loss"``, ``"min"``).
        branch_at: the branch point for the branched variant (a block index or path, as in
            :func:`~gradconflict.split.branch`); without it that variant is skipped, with a note.
        groups: task groups for the branched variant; default one branch per task.
        seed: seeds model construction, adapters and training; two runs with the same seed give the same losses
            and metrics (costs are measurements and vary). When the seed does not change the model's initial
            weights (a model passed as is, a factory that seeds itself), a note says so.
        variants: which of ``"shared"``, ``"independent"``, ``"lora"``, ``"branched"`` to run.
        progress: show tqdm progress bars (if tqdm is installed), on a terminal only.
        split_fraction: share of the budget trained shared before lora and branched split, in [0, 1).
        lora_rank: the adapters' rank.
        evals: number of evaluations over the run (the best and final metrics are read from them).
        blocks: block paths, for backbones that are not ``nn.Sequential`` / ``nn.ModuleList`` (for branching).
        weightings: conflict-aware updates to try on the shared model, each a variant ``shared+<name>``: method
            names (``"upgrad"``, ``"pcgrad"``, ...) or weightings (see :mod:`gradconflict.weighting`). Each step of
            such a variant is a measured step, so its step time includes the measurement.
        cost_repeats: training steps and inference calls timed per variant, once every variant has trained,
            round-robin over the variants (see :func:`~gradconflict.split.costs.interleaved_ms`); the records hold
            the medians, wall-clock and CPU time.

    >>> import torch, torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> def factory():
    ...     return MultiTaskNet(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh()),
    ...                         {"a": nn.Linear(16, 1), "b": nn.Linear(16, 1)})
    >>> g = torch.Generator().manual_seed(0)
    >>> data = [(x, {"a": x[:, :1], "b": -x[:, 1:2]}) for x in torch.randn(4, 32, 4, generator=g)]
    >>> mse = nn.functional.mse_loss
    >>> res = compare(factory, {"a": mse, "b": mse}, data, steps=20, branch_at=2, progress=False)
    >>> sorted(res.variants), len(res.rows)
    (['branched', 'independent', 'lora', 'shared'], 8)
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {list(variants)}")
    if steps < 1 or evals < 1 or cost_repeats < 1:
        raise ValueError(
            f"steps, evals and cost_repeats must be positive, got steps={steps}, evals={evals}, "
            f"cost_repeats={cost_repeats}"
        )
    if not 0.0 <= split_fraction < 1.0:
        raise ValueError(f"split_fraction must be in [0, 1), got {split_fraction}")
    tasks = list(loss_fns)
    if not tasks:
        raise ValueError("loss_fns is empty: give one loss function per task")
    methods = {f"shared+{m.name}": m for m in map(make_weighting, weightings)}  # unknown names fail before training
    if len(methods) != len(weightings):
        raise ValueError(f"weightings names a method twice: {[str(w) for w in weightings]}")

    def make(model_seed: int = seed) -> nn.Module:
        torch.manual_seed(model_seed)  # same initialisation for every variant
        model = copy.deepcopy(model_factory) if isinstance(model_factory, nn.Module) else model_factory()
        _, heads = check_convention(model)
        missing = [t for t in tasks if t not in heads]
        if missing:
            raise ValueError(f"the model has no head for tasks {missing}; its heads are {list(heads)}")
        return model

    probe = make()
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    batches = [_to(b, device) for b in _record_batches(train_data, steps, tasks)]
    eval_batches = [_to(b, device) for b in (train_data if eval_data is None else eval_data)]
    if not eval_batches:
        raise ValueError("eval_data yielded no batch (a used-up one-shot iterator?): pass a list or a DataLoader")
    _check_batch(eval_batches[0], tasks, "eval_data")
    exp = _Experiment(
        loss_fns,
        batches,
        eval_batches,
        _metric_spec(metrics, loss_fns),
        {round(steps * k / evals) for k in range(1, evals + 1)} - {0},
        optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3)),
        device,
        progress,
    )
    split_step = int(steps * split_fraction)
    trained: dict[str, _Trained] = {}
    notes: list[str] = []
    if not _seed_reaches_model(make, seed, probe):
        notes.append(
            f"seed={seed} does not reach the model's initialisation (a model passed as is, or a factory that seeds "
            "itself): runs over several seeds then differ only in what else the seed draws, and with fixed batches "
            "may be identical; split_gains flags identical runs"
        )
    want_split = [v for v in ("lora", "branched") if v in variants]
    if "branched" in want_split and branch_at is None:
        want_split.remove("branched")
        notes.append("branched skipped: pass branch_at= (and groups=), e.g. from the diagnosis' advice")

    def fresh_run() -> _Run:
        return _Run({t: [] for t in tasks}, [])

    with ExitStack() as monitors:  # the weightings' monitors stay open until their costs are timed
        checkpoint: tuple[nn.Module, _Run] | None = None
        if "shared" in variants or want_split:
            run, members = fresh_run(), [exp.member(probe, tasks)]
            torch.manual_seed(seed)
            exp.train("shared", members, run, 0, split_step)
            checkpoint = (copy.deepcopy(probe), copy.deepcopy(run))
            if "shared" in variants:
                exp.train("shared", members, run, split_step, steps, measure_memory=split_step == 0)
                trained["shared"] = _Trained(members, run, 0)
        if "independent" in variants:
            run = fresh_run()
            members = [exp.member(make(), [t]) for t in tasks]
            torch.manual_seed(seed)
            exp.train("independent", members, run, 0, steps)
            trained["independent"] = _Trained(members, run, 0)
        for name, method in methods.items():
            run, model = fresh_run(), make()
            member = exp.member(model, tasks)
            member.monitor = monitors.enter_context(ConflictMonitor(model, shared=model.backbone))
            member.weighting = method
            torch.manual_seed(seed)
            exp.train(name, [member], run, 0, steps)
            trained[name] = _Trained([member], run, 0)
        for name in want_split:
            assert checkpoint is not None
            model, run = copy.deepcopy(checkpoint[0]), copy.deepcopy(checkpoint[1])
            run.memory_bytes = 0
            torch.manual_seed(seed)
            if name == "lora":
                split: nn.Module = lora_split(model, tasks, rank=lora_rank, targets="all")
            else:
                assert branch_at is not None  # a branched variant without it was skipped above
                split = branch(model, branch_at, groups, blocks=blocks)
            members = [exp.member(split, tasks)]
            exp.train(name, members, run, split_step, steps)
            trained[name] = _Trained(members, run, split_step)
        costs = exp.costs(trained, cost_repeats)
    order = [v for v in variants if v == "shared"] + list(methods) + [v for v in variants if v != "shared"]
    ordered = {v: exp.record(v, trained[v], *costs[v]) for v in order if v in trained}
    return ComparisonResult(
        ordered, tasks, steps=steps, split_step=split_step, notes=notes,
        branch_at=branch_at if "branched" in ordered else None,
        groups=[list(g) for g in (groups or [[t] for t in tasks])] if "branched" in ordered else None,
        seed=seed,
    )


def _seed_reaches_model(make: Callable[[int], nn.Module], seed: int, probe: nn.Module) -> bool:
    """Whether the model built under another seed starts from other weights than ``probe``, built under ``seed``
    (``make(s)`` seeds with ``s``, then builds)."""
    other = make(seed + 1)
    mine, theirs = probe.state_dict(), other.state_dict()
    return any(not torch.equal(v, theirs[k]) for k, v in mine.items() if v.is_floating_point())
