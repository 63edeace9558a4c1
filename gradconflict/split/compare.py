"""Step 1, the comparison experiment: train the split variants side by side at small scale and tabulate them.

The variants, all from the same initialisation (``torch.manual_seed(seed)`` before each model is built), with
the same step budget and exactly the same batches in the same order:

- ``shared``: one model, all tasks, the summed loss, for the whole budget.
- ``independent``: one copy of the model per task, each trained on its own loss alone for the whole budget.
- ``lora``: the shared model after ``split_fraction`` of the budget (default half), backbone frozen, then one
  LoRA adapter per task on every weight LoRA adapts (``lora_split(..., targets="all")``) and the heads, trained
  for the rest: the logical split at equal total budget.
- ``branched``: the same shared model at the same point, branched at ``branch_at`` into ``groups``, then every
  copy trained for the rest: the physical split at equal total budget. Given several branch points
  (``branch_at=[...]``), one such variant per point, ``branched@<point>``, each branched from the same shared
  checkpoint: the other variants train once for all of them.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from gradconflict.monitor import ConflictMonitor
from gradconflict.records.comparison import ComparisonResult
from gradconflict.split.branch import branch
from gradconflict.split.experiment import (
    Batch,
    LossFn,
    MetricSpec,
    _check_batch,
    _Experiment,
    _metric_spec,
    _record_batches,
    _Run,
    _to,
    _Trained,
)
from gradconflict.split.lora import lora_split
from gradconflict.split.model import check_convention
from gradconflict.weighting import WeightingSpec, make_weighting

__all__ = ["VARIANTS", "compare"]

VARIANTS = ("shared", "independent", "lora", "branched")



def compare(
    model_factory: Callable[[], nn.Module] | nn.Module,
    loss_fns: Mapping[str, LossFn],
    train_data: Iterable[Batch],
    steps: int = 200,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    eval_data: Iterable[Batch] | None = None,
    metrics: MetricSpec | None = None,
    branch_at: int | str | Sequence[int | str] | None = None,
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
            :func:`~gradconflict.split.branch`); without it that variant is skipped, with a note. A list or tuple
            of points runs one branched variant per point, named ``branched@<point>`` (``str(point)``), in the
            order given, each bit-identical to the ``branched`` variant of ``compare(branch_at=point)`` with the
            same seed; every other variant trains once.
        groups: task groups for the branched variant(s); default one branch per task.
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

    Several branch points in one call: the shared, independent and lora models train once.

    >>> res = compare(factory, {"a": mse, "b": mse}, data, steps=20, branch_at=[0, 2], progress=False)
    >>> list(res.variants), res.branch_at
    (['shared', 'independent', 'lora', 'branched@0', 'branched@2'], [0, 2])
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
    branched = _branched_variants(branch_at)

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
    if "branched" in variants and not branched:
        notes.append("branched skipped: pass branch_at= (and groups=), e.g. from the diagnosis' advice")
    # each variant by name: the variants asked for, the branched one as one variant per branch point
    variant_names = [n for v in variants for n in (list(branched) if v == "branched" else [v])]
    want_split = [n for n in variant_names if n == "lora" or n in branched]

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
                split = branch(model, branched[name], groups, blocks=blocks)
            members = [exp.member(split, tasks)]
            exp.train(name, members, run, split_step, steps)
            trained[name] = _Trained(members, run, split_step)
        costs = exp.costs(trained, cost_repeats)
    order = [v for v in variant_names if v == "shared"] + list(methods) + [v for v in variant_names if v != "shared"]
    ordered = {v: exp.record(v, trained[v], *costs[v]) for v in order if v in trained}
    points: int | str | list[int | str] | None = None  # the branch point(s), when a branched variant ran
    if any(v in branched for v in ordered):
        points = branched["branched"] if "branched" in branched else list(branched.values())
    return ComparisonResult(
        ordered, tasks, steps=steps, split_step=split_step, notes=notes, branch_at=points,
        groups=[list(g) for g in (groups or [[t] for t in tasks])] if points is not None else None,
        seed=seed,
    )


def _branched_variants(branch_at: int | str | Sequence[int | str] | None) -> dict[str, int | str]:
    """The branched variants' names and branch points: ``{"branched": point}`` for one point, ``{"branched@<point>":
    point}`` for each of a list or tuple of points, ``{}`` without any."""
    if branch_at is None:
        return {}
    if isinstance(branch_at, (int, str)):
        return {"branched": branch_at}
    if not isinstance(branch_at, (list, tuple)) or not branch_at:
        raise ValueError(f"branch_at must be a branch point or a non-empty list of them, got {branch_at!r}")
    named = {f"branched@{point}": point for point in branch_at}
    if len(named) != len(branch_at):
        raise ValueError(f"branch_at names a branch point twice: {list(branch_at)}")
    return named


def _seed_reaches_model(make: Callable[[int], nn.Module], seed: int, probe: nn.Module) -> bool:
    """Whether the model built under another seed starts from other weights than ``probe``, built under ``seed``
    (``make(s)`` seeds with ``s``, then builds)."""
    other = make(seed + 1)
    mine, theirs = probe.state_dict(), other.state_dict()
    return any(not torch.equal(v, theirs[k]) for k, v in mine.items() if v.is_floating_point())
