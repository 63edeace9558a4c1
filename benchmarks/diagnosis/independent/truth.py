"""The truth of each problem: train every variant over several seeds and judge each against shared.

This training code is written separately from :func:`gradconflict.split.compare` and its statistics from
:func:`gradconflict.split.split_gains` (only the model surgery is borrowed: ``lora_split`` builds the per-task
adapters, ``branch`` the branched copies). For each seed ``s``:

- the model is built from seed ``s`` (:meth:`Problem.model`) and every variant sees the same ``steps`` minibatches
  (:meth:`Problem.batch_indices`), in the same order, with ``torch.manual_seed(s)`` before it trains;
- ``shared``: the summed (task-scaled) loss for the whole budget, Adam at the problem's learning rate;
- ``independent``: one copy of the initial model per task, each on its own loss for the whole budget;
- ``lora`` and ``branched@backbone.k`` (every block k): the shared model after half the budget, then per-task
  LoRA adapters (rank 4, every Linear and Conv layer of the frozen backbone, heads training) or the backbone
  branched at block k, one copy per task, trained with a fresh Adam for the other half;
- ``balanced``: the shared model trained on the sum of each task's loss divided by that task's loss on the seed's
  first minibatch at initialisation (a loss normalisation written here, the simplest magnitude-aware weighting);
- ``imtl-g`` and ``aligned-mtl`` (:data:`WEIGHTINGS`, the magnitude-aware weightings the advice names as the cheap
  cure, under gradconflict's names): the shared model trained for the whole budget with TorchJD's aggregator
  (``IMTLG``, ``AlignedMTL``) on the Jacobian of the task losses with respect to the backbone's parameters
  (TorchJD's ``mtl_backward`` and ``jac_to_grad``); each head gets the gradient of its own loss. TorchJD's code,
  not gradconflict's, combines the gradients;
- for problems of 3 or more tasks that split: the backbone branched at the economical block into every partition
  of the tasks into 2 groups, and into one group per task, the same way (partitions into 3 groups of 4 tasks are
  left out to keep the run small).

Every variant is scored on the held-out set at the end: accuracy (classification) or mean squared error
(regression). Its gain over shared on a seed is Delta-m%: the mean over tasks of the relative improvement on the
task's metric against the same seed's shared model (positive: better).

**A variant beats shared** when its mean gain is at least :data:`FLOOR` (1% Delta-m) and a one-sided paired
t-test of the per-seed gains against 0 gives p < :data:`ALPHA` (0.05).

**Verdict.** ``keep_shared`` when no split variant beats shared. Otherwise the physical split (a branched variant
or the fully independent models) or the logical one (``lora``), whichever has the larger mean gain among those
that beat shared; the other is also accepted when it beats shared too and recovers at least :data:`RECOVER`
(80%) of that gain. When a split wins, every re-weighted shared variant of :data:`CURES` (``balanced``, ``imtl-g``,
``aligned-mtl``) that beats shared too and recovers 80% of the best split's gain adds ``keep_shared+<variant>``
to the accepted verdicts: that cheaper cure of dominating magnitudes suffices. An advice that says keep_shared and
names a weighting to train the shared model with counts when ``keep_shared+<the weighting it names>`` or
``keep_shared+balanced`` is accepted (the loss normalisation stands in for a weighting the truth does not train);
its groups (all tasks in one) count then too, and its branch point is not scored.

**Branch blocks.** Acceptable: every block whose branched variant beats shared and recovers at least 80% of the
best branched variant's gain (when only the independent models beat shared: the bottom block, the full split).
Economical: the highest acceptable block (the cheapest split that recovers most of the gain).

**Groups.** ``keep_shared``: all tasks in one group. A split of 2 tasks: one group each. A split of 3 or more
tasks: among the partitions whose branched variant (at the economical block) beats shared and recovers 80% of the
best partition's gain, the one with the fewest groups (then the larger gain); a lora-only split: one group per
task (the adapters measured are per task).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from torch import nn
from torchjd.aggregation import IMTLG, Aggregator, AlignedMTL
from torchjd.autojac import jac_to_grad, mtl_backward

from gradconflict.split import branch, lora_split

from .problems import Problem

#: Practical floor: a split must gain at least this much Delta-m% (mean over seeds) to count.
FLOOR = 1.0
#: Level of the one-sided paired t-test across seeds.
ALPHA = 0.05
#: The share of the best gain an economical choice must recover.
RECOVER = 0.8
#: LoRA adapters' rank.
RANK = 4
BLOCKS = 4
HERE = Path(__file__).resolve().parent
CACHE = HERE / "truth.json"
#: The magnitude-aware weightings the advice can name as the cheap cure (gradconflict's names), each trained here
#: with TorchJD's aggregator of that method.
WEIGHTINGS: dict[str, type[Aggregator]] = {"imtl-g": IMTLG, "aligned-mtl": AlignedMTL}
#: The re-weighted shared variants: the loss normalisation, then :data:`WEIGHTINGS`.
CURES = ("balanced", *WEIGHTINGS)


@dataclass
class Judgement:
    """One variant against shared over the seeds."""

    per_seed: list[float]
    mean: float
    p_value: float
    wins: bool


@dataclass
class Truth:
    """What training every variant showed on one problem."""

    name: str
    fingerprint: str
    seeds: int
    metrics: dict[str, list[dict[str, float]]]  # variant -> per seed {task: held-out metric}
    judged: dict[str, Judgement]
    verdict: str
    verdicts: list[str]  # every acceptable verdict
    blocks: list[str]  # acceptable branch blocks
    economical: str | None
    groups: list[list[str]]
    groups_acceptable: list[list[list[str]]]
    partitions: dict[str, Judgement] = field(default_factory=dict)
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # CPU time of the process that measured it (torch on 1 thread)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Truth:
        d = dict(d)
        d["judged"] = {k: Judgement(**v) for k, v in d["judged"].items()}
        d["partitions"] = {k: Judgement(**v) for k, v in d["partitions"].items()}
        return cls(**d)


# ------------------------------------------------------------------------------------------------- training


class _Trainer:
    """Trains one model on some tasks over a fixed list of minibatches and scores it on the held-out set."""

    def __init__(self, problem: Problem, seed: int) -> None:
        self.p = problem
        self.seed = seed
        self.batches = problem.batch_indices(seed)
        self.loss_fns = problem.loss_fns()

    def train(
        self, model: nn.Module, tasks: Sequence[str], start: int, stop: int, balanced: bool = False,
        weighting: str | None = None,
    ) -> nn.Module:
        """``model`` trained on ``tasks`` over minibatches ``start:stop``: on the sum of the losses (each divided by
        its initial value with ``balanced``), or with ``weighting`` (a key of :data:`WEIGHTINGS`) combining the
        task gradients on the backbone."""
        torch.manual_seed(self.seed)
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.p.lr)
        model.train()
        scale = {t: 1.0 for t in tasks}
        if balanced:  # each task's loss over its value on the first minibatch at the start
            with torch.no_grad():
                first = self.batches[0]
                out = model(self.p.x[first])
                scale = {t: 1.0 / max(float(self.loss_fns[t](out[t], self.p.y[t][first])), 1e-12) for t in tasks}
        aggregator = None if weighting is None else WEIGHTINGS[weighting]()
        for idx in self.batches[start:stop]:
            optimizer.zero_grad(set_to_none=True)
            if aggregator is None:
                out = model(self.p.x[idx])
                loss = sum(scale[t] * self.loss_fns[t](out[t], self.p.y[t][idx]) for t in tasks)
                loss.backward()
            else:
                self.jacobian_backward(model, tasks, idx, aggregator)
            optimizer.step()
        return model

    def jacobian_backward(self, model: nn.Module, tasks: Sequence[str], idx: torch.Tensor,
                           aggregator: Aggregator) -> None:
        """``.grad`` of one step of Jacobian descent: the backbone's from ``aggregator`` on the Jacobian of the task
        losses (one row per task), each head's from its own loss."""
        features = model.backbone(self.p.x[idx])
        losses = [self.loss_fns[t](model.heads[t](features), self.p.y[t][idx]) for t in tasks]
        shared = [q for q in model.backbone.parameters() if q.requires_grad]
        heads = [[q for q in model.heads[t].parameters() if q.requires_grad] for t in tasks]
        mtl_backward(losses, features=features, tasks_params=heads, shared_params=shared)
        jac_to_grad(shared, aggregator)

    def score(self, model: nn.Module, tasks: Sequence[str]) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            out = model(self.p.x_test)
        metrics = self.p.metrics()
        return {t: metrics[t][0](out[t], self.p.y_test[t]) for t in tasks}


def seed_metrics(problem: Problem, seed: int) -> dict[str, dict[str, float]]:
    """Held-out metrics of every variant (shared, independent, the re-weighted shared models of :data:`CURES`,
    lora, branched at each block) for one seed."""
    run = _Trainer(problem, seed)
    tasks, half = problem.names, problem.steps // 2
    out: dict[str, dict[str, float]] = {}
    model = run.train(problem.model(seed), tasks, 0, half)
    warm = copy.deepcopy(model)
    out["shared"] = run.score(run.train(model, tasks, half, problem.steps), tasks)
    independent: dict[str, float] = {}
    for t in tasks:
        independent.update(run.score(run.train(problem.model(seed), [t], 0, problem.steps), [t]))
    out["independent"] = independent
    out["balanced"] = run.score(run.train(problem.model(seed), tasks, 0, problem.steps, balanced=True), tasks)
    for name in WEIGHTINGS:
        out[name] = run.score(run.train(problem.model(seed), tasks, 0, problem.steps, weighting=name), tasks)
    torch.manual_seed(seed)  # the adapters' initial draws
    adapted = lora_split(copy.deepcopy(warm), tasks, rank=RANK, targets="all")
    out["lora"] = run.score(run.train(adapted, tasks, half, problem.steps), tasks)
    for k in range(BLOCKS):
        split = branch(copy.deepcopy(warm), at=k)
        out[f"branched@backbone.{k}"] = run.score(run.train(split, tasks, half, problem.steps), tasks)
    return out


def partition_metrics(problem: Problem, seed: int, at: str, partitions: list[list[list[str]]]) -> list[dict]:
    """Held-out metrics of the backbone branched at ``at`` into each of ``partitions``, for one seed."""
    run = _Trainer(problem, seed)
    tasks, half = problem.names, problem.steps // 2
    warm = run.train(problem.model(seed), tasks, 0, half)
    return [run.score(run.train(branch(copy.deepcopy(warm), at=at, groups=g), tasks, half, problem.steps), tasks)
            for g in partitions]


def set_partitions(items: list[str]) -> Iterator[list[list[str]]]:
    """Every partition of ``items`` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in set_partitions(rest):
        for k in range(len(smaller)):
            yield smaller[:k] + [[first, *smaller[k]]] + smaller[k + 1:]
        yield [[first], *smaller]


def canonical(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Groups with sorted tasks, sorted by their first task (the advice's convention)."""
    return sorted(sorted(g) for g in groups)


# ----------------------------------------------------------------------------------------------- statistics


def gain(metrics: dict[str, float], shared: dict[str, float], directions: dict[str, str]) -> float:
    """Delta-m% of ``metrics`` against ``shared``: mean over tasks of the signed relative improvement."""
    terms = []
    for t, value in metrics.items():
        base = shared[t]
        sign = 1.0 if directions[t] == "max" else -1.0
        terms.append(100.0 * sign * (value - base) / abs(base))
    return statistics.fmean(terms)


def judge(per_seed: list[float]) -> Judgement:
    """Mean gain, one-sided paired t-test p-value (H1: gain > 0) and whether it beats shared."""
    mean = statistics.fmean(per_seed)
    sd = statistics.stdev(per_seed) if len(per_seed) > 1 else math.nan
    if len(per_seed) < 2:
        p = math.nan
    elif sd == 0:
        p = 0.0 if mean > 0 else 1.0
    else:
        p = float(stats.t.sf(mean / (sd / math.sqrt(len(per_seed))), len(per_seed) - 1))
    return Judgement(per_seed, mean, p, bool(mean >= FLOOR and p < ALPHA))


def judge_all(seeds: list[dict[str, dict[str, float]]], directions: dict[str, str]) -> dict[str, Judgement]:
    return {
        v: judge([gain(s[v], s["shared"], directions) for s in seeds]) for v in seeds[0] if v != "shared"
    }


def decide(judged: dict[str, Judgement], tasks: list[str]) -> tuple[str, list[str], list[str], str | None]:
    """``(verdict, acceptable verdicts, acceptable blocks, economical block)`` (see the module docstring)."""
    branched = {v.split("@", 1)[1]: j for v, j in judged.items() if v.startswith("branched@")}
    physical = [j.mean for v, j in judged.items() if j.wins and (v == "independent" or v.startswith("branched@"))]
    lora = judged["lora"].mean if judged["lora"].wins else None
    if not physical and lora is None:
        return "keep_shared", ["keep_shared"], [], None
    options = {}
    if physical:
        options["physical_split"] = max(physical)
    if lora is not None:
        options["lora_split"] = lora
    verdict = max(options, key=options.__getitem__)
    verdicts = [verdict] + [v for v, m in options.items() if v != verdict and m >= RECOVER * options[verdict]]
    verdicts += [f"keep_shared+{c}" for c in CURES
                 if c in judged and judged[c].wins and judged[c].mean >= RECOVER * options[verdict]]
    won = {b: j.mean for b, j in branched.items() if j.wins}
    if won:
        best = max(won.values())
        blocks = [b for b, m in won.items() if m >= RECOVER * best]
    elif physical:
        blocks = ["backbone.0"]  # only the fully independent models won: the full split
    else:
        blocks = []
    blocks.sort(key=lambda b: int(b.split(".")[1]))
    return verdict, verdicts, blocks, (blocks[-1] if blocks else None)


def measure(problem: Problem, seeds: int, log: Any = print) -> Truth:
    """Train every variant of ``problem`` over ``seeds`` seeds and derive its truth."""
    started, cpu = time.perf_counter(), time.process_time()
    tasks = problem.names
    directions = {t: d for t, (_, d) in problem.metrics().items()}
    per_seed = [seed_metrics(problem, s) for s in range(seeds)]
    judged = judge_all(per_seed, directions)
    verdict, verdicts, blocks, economical = decide(judged, tasks)
    metrics = {v: [s[v] for s in per_seed] for v in per_seed[0]}
    partitions: dict[str, Judgement] = {}
    if verdict == "keep_shared":
        groups, acceptable = [sorted(tasks)], [[sorted(tasks)]]
    elif len(tasks) == 2 or economical is None:
        groups = canonical([[t] for t in tasks])
        acceptable = [groups]
    else:
        candidates = [canonical(g) for g in set_partitions(tasks) if len(g) == 2 or len(g) == len(tasks)]
        runs = [partition_metrics(problem, s, economical, candidates) for s in range(seeds)]
        for k, g in enumerate(candidates):
            key = json.dumps(g)
            partitions[key] = judge([gain(runs[s][k], per_seed[s]["shared"], directions) for s in range(seeds)])
            metrics[f"partition {key}"] = [runs[s][k] for s in range(seeds)]
        won = {k: j.mean for k, j in partitions.items() if j.wins}
        if won:
            best = max(won.values())
            good = [json.loads(k) for k, m in won.items() if m >= RECOVER * best]
            good.sort(key=lambda g: (len(g), -won[json.dumps(g)]))
            groups, acceptable = good[0], good
        else:
            groups = canonical([[t] for t in tasks])
            acceptable = [groups]
    truth = Truth(
        problem.name, problem.fingerprint(), seeds, metrics, judged, verdict, verdicts, blocks, economical,
        groups, acceptable, partitions, time.perf_counter() - started, time.process_time() - cpu,
    )
    log(
        f"{problem.name:30} {verdict:15} ok={','.join(verdicts)} blocks={blocks} economical={economical} "
        f"groups={groups} ({truth.seconds:.0f} s, {truth.cpu_seconds:.0f} s CPU)"
    )
    return truth


def is_current(truth: Truth, problem: Problem, seeds: int) -> bool:
    """Was ``truth`` measured on ``problem`` as it is now, over ``seeds`` seeds, with every re-weighted variant?"""
    return truth.fingerprint == problem.fingerprint() and truth.seeds == seeds and set(CURES) <= set(truth.judged)


def load_cache(path: Path = CACHE) -> dict[str, Truth]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: Truth.from_dict(d) for name, d in data["problems"].items()}


def load_meta(path: Path = CACHE) -> dict[str, Any]:
    """The cached truth's run details (date, machine, seeds, seconds)."""
    return json.loads(path.read_text(encoding="utf-8")).get("meta", {}) if path.exists() else {}


def save_cache(truths: dict[str, Truth], meta: dict[str, Any], path: Path = CACHE) -> None:
    body = {"meta": meta, "problems": {n: t.to_dict() for n, t in truths.items()}}
    path.write_text(json.dumps(body, indent=1, allow_nan=True) + "\n", encoding="utf-8")
