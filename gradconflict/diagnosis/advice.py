"""The answer to "should we split the shared backbone, where, and into which task groups?", with the evidence.

:func:`advise` reads a run's history (and, optionally, the model, a probe batch, an evaluation table, an exact
lookahead) and returns an :class:`Advice`:

- ``physical_split``: the tasks' objectives diverge (signal 1 says ``split``) and the layer profile finds a
  depth from which the layers conflict: copy the backbone from ``branch_point`` up, one copy per task group.
- ``lora_split``: some signal says ``split`` but there is no consistent depth to branch at (or the trouble is
  heavy heads, zero-sum evaluations or negative transference rather than diverging gradients): freeze the
  shared backbone and train one LoRA adapter per group.
- ``keep_shared``: no signal says ``split`` (or the conflict could not be measured: no step carried two tasks
  together, as in round-robin training; the reason says so and what to measure).

Tasks are tracked by name: the diagnosis works on the sorted union of the task names over the measured steps
(:mod:`~gradconflict.diagnosis.aligned`), so the order of the losses dict never changes the advice, and steps
may carry a subset of the tasks (each pair is judged on the steps that carried both). Groups list their tasks in
sorted order, and the groups are sorted by their first task.

>>> import torch
>>> from gradconflict import ConflictReport, LayerReport
>>> fight, agree = torch.tensor([[1.0, -0.8], [-0.8, 1.0]]), torch.tensor([[1.0, 0.9], [0.9, 1.0]])
>>> layers = {"top": LayerReport("top", "ab", fight, num_params=10),
...           "bottom": LayerReport("bottom", "ab", agree * 0.1, num_params=10)}
>>> run = [ConflictReport("ab", fight + agree * 0.1, losses=torch.ones(2), layers=layers, step=s) for s in range(8)]
>>> advice = advise(run, layer_order=["bottom", "top"])
>>> advice.verdict, advice.branch_point, advice.groups
('physical_split', 'top', [['a'], ['b']])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn

from gradconflict.diagnosis.affinity import lookahead_transference, mean_transference, normalized
from gradconflict.diagnosis.aligned import Run, align, no_pair_reason
from gradconflict.diagnosis.evaluations import Pairs
from gradconflict.diagnosis.groups import Grouping, group_tasks
from gradconflict.diagnosis.profile import Profile, layer_profile
from gradconflict.diagnosis.signals import (
    Signal,
    diverging_objectives,
    heavy_heads,
    single_point_of_risk,
    zero_sum,
)
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import QuantitySummary, summarize
from gradconflict.history import History

__all__ = ["Advice", "advise", "advise_from_jsonl", "next_step_code"]

Verdict = Literal["keep_shared", "lora_split", "physical_split"]


def _json_ready(value: Any) -> Any:
    """``value`` with every non-finite float (a pair never measured together) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def next_step_code(
    verdict: Verdict, branch_at: str | None, groups: Sequence[Sequence[str]], conflict: bool = False
) -> str:
    """Python code running the split toolkit's comparison experiment for this advice.

    With ``conflict`` (the diagnosis found the task gradients diverging, not only heavy heads or zero-sum
    evaluations), the experiment also trains the shared model with conflict-aware updates (``weightings=``, see
    :mod:`gradconflict.weighting`): the cheaper cure, if it lifts the tasks as far as the split does.

    >>> print(next_step_code("physical_split", "backbone.4", [["a"], ["b"]]).splitlines()[-2])
                     eval_data=None, metrics=None, branch_at='backbone.4', groups=[['a'], ['b']], seed=0)
    >>> print(next_step_code("physical_split", "backbone.4", [["a"], ["b"]], conflict=True).splitlines()[-2])
                     weightings=["upgrad", "pcgrad"])
    """
    why = {
        "physical_split": f"the shared model against one backbone copy per group, branching at {branch_at!r}",
        "lora_split": "the shared model against a frozen shared backbone with one LoRA adapter per group",
        "keep_shared": "the shared model against fully independent models,\n# to confirm that no task's "
        "ceiling rises when trained alone",
    }[verdict]
    call = f"branch_at={branch_at!r}, groups={[list(g) for g in groups]!r}, seed=0"
    close = ',\n                 weightings=["upgrad", "pcgrad"])' if conflict else ")"
    lines = [
        "import torch",
        "from gradconflict import compare",
        "",
        f"# Compares {why}.",
        "# model_factory: () -> a fresh model; loss_fns: {task: (output, target) -> loss}; train_data: your batches.",
    ]
    if conflict:
        lines += [
            "# The gradients conflict: shared+upgrad and shared+pcgrad train the shared model with conflict-aware",
            "# updates, the cheaper cure if they do as well as the split ('upgrad' needs pip install",
            "# 'gradconflict[weighting]'; 'pcgrad' and 'mgda' do not).",
        ]
    lines += [
        "result = compare(model_factory, loss_fns, train_data, steps=200,",
        "                 optimizer_factory=lambda params: torch.optim.Adam(params, lr=1e-3),",
        f"                 eval_data=None, metrics=None, {call}{close}",
        "print(result.to_markdown())",
    ]
    return "\n".join(lines)


@dataclass
class Advice:
    """Whether, where and how to split the shared backbone, with the evidence.

    Attributes:
        verdict: ``"keep_shared"``, ``"lora_split"`` or ``"physical_split"``.
        branch_point: the layer from which the backbone becomes task-specific (``physical_split`` only).
        groups: the task groups that should share a backbone (copy or adapter); one group for ``keep_shared``.
        signals: the four :class:`~gradconflict.diagnosis.signals.Signal`.
        next_step: Python code running the comparison experiment that checks this advice.
        reason: one sentence on why this verdict.
        duplicated_share: share of the profiled backbone parameters a physical split at ``branch_point``
            duplicates (0 otherwise).
        profile: the layer conflict profile (``None`` when the reports have no layers).
        grouping: the task grouping search (best partition per number of groups, with scores).
        trends: a summary (mean, EMA, windows, trend) of each aggregated quantity.
    """

    verdict: Verdict
    branch_point: str | None
    groups: list[list[str]]
    signals: list[Signal]
    next_step: str
    reason: str
    duplicated_share: float = 0.0
    profile: Profile | None = None
    grouping: Grouping | None = None
    trends: dict[str, QuantitySummary] = field(default_factory=dict)

    def signal(self, name: str) -> Signal:
        """The signal called ``name``."""
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(f"no signal {name!r}; the signals are {[s.name for s in self.signals]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view; a value that could not be measured (NaN: a pair never measured
        together) is ``None``."""
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "branch_point": self.branch_point,
            "groups": self.groups,
            "reason": self.reason,
            "duplicated_share": self.duplicated_share,
            "signals": [s.to_dict() for s in self.signals],
            "next_step": self.next_step,
            "trends": {
                k: {"mean": q.mean, "ema": q.ema, "first_window": q.first_window, "last_window": q.last_window,
                    "slope": q.trend.slope, "tau": q.trend.tau, "p_value": q.trend.p_value}
                for k, q in self.trends.items()
            },
        }
        if self.profile is not None:
            out["profile"] = {
                "branch_point": self.profile.branch_point,
                "threshold": self.profile.threshold,
                "layers": [
                    {"name": lp.name, "num_params": lp.num_params, "steps": lp.steps, "score": lp.score,
                     "worst_persistence": lp.worst_persistence, "persistence": lp.persistence.tolist(),
                     "mean_cosine": lp.mean_cosine.tolist(),
                     "together": None if lp.together is None else lp.together.tolist()}
                    for lp in self.profile.layers
                ],
            }
        if self.grouping is not None:
            out["grouping"] = {
                "method": self.grouping.method,
                "by_count": {str(k): {"groups": g, "score": s} for k, (g, s) in self.grouping.by_count.items()},
            }
        return _json_ready(out)

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}"]
        if self.branch_point is not None:
            lines.append(
                f"branch point: {self.branch_point} (duplicates {self.duplicated_share:.0%} of the profiled "
                "backbone parameters)"
            )
        lines.append("groups: " + " | ".join("[" + ", ".join(g) + "]" for g in self.groups))
        lines += [f"why: {self.reason}", "", "signals:"]
        lines += [f"  {s}" for s in self.signals]
        if self.profile is not None:
            lines += ["", "layer conflict profile (bottom to top):"]
            lines += ["  " + row for row in self.profile.table().splitlines()]
        if self.grouping is not None:
            lines += ["", f"task groups ({self.grouping.method} search; score per number of groups):"]
            lines += [
                f"  {k}: {' | '.join('[' + ', '.join(g) + ']' for g in gs)}  score {s:+.3f}"
                for k, (gs, s) in self.grouping.by_count.items()
            ]
        if self.trends:
            lines += ["", "over training (mean, last window, Theil-Sen slope per step, Mann-Kendall p):"]
            lines += [
                f"  {k:<24} {q.mean:+.3f}  {q.last_window:+.3f}  {q.trend.slope:+.2e}  p={q.trend.p_value:.2g}"
                for k, q in self.trends.items()
            ]
        lines += ["", "next step:"] + ["  " + row for row in self.next_step.splitlines()]
        return "\n".join(lines)


def advise(
    history: Run,
    *,
    model: nn.Module | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    backbone: nn.Module | None = None,
    probe: Any = None,
    evaluations: Sequence[Mapping[str, float]] | Any = None,
    higher_is_better: Mapping[str, bool] | None = None,
    evaluation_pairs: Pairs = "consecutive",
    layer_order: Sequence[str] | None = None,
    thresholds: Thresholds | Mapping[str, Any] | None = None,
    lr: float = 1.0,
    lookahead: Callable[[], Mapping[str, Tensor]] | None = None,
    max_groups: int | None = None,
    ema_decay: float = 0.9,
) -> Advice:
    """Diagnose a run and advise whether, where and how to split its shared backbone.

    Tasks are tracked by name, in sorted order: the key order of the losses dicts never matters, and steps may
    carry a subset of the tasks (partial labels: each pair is judged on the steps that carried both) or a single
    one (round-robin training: without a step carrying two tasks, the conflict cannot be measured, the gradient
    signals are ``n/a`` and the reason says what to measure). Raises ``ValueError`` when no step was measured.

    Args:
        history: the run (a :class:`~gradconflict.History`, any iterable of reports, or an
            :class:`~gradconflict.diagnosis.aligned.Aligned`).
        model: the model, for the layer order and, with ``.heads``/``.backbone``, the heavy-heads signal.
        heads: task -> head module (default ``model.heads``).
        backbone: the backbone module (default ``model.backbone``).
        probe: a batch for ``model(probe)``: measures how much each head rewrites the backbone's features.
        evaluations: per-task metrics across evaluations or runs (list of dicts or DataFrame) for signal 3.
        higher_is_better: direction of each evaluation metric (default: every column, higher is better).
        evaluation_pairs: ``"consecutive"`` (evaluations over time) or ``"all"`` (unordered runs).
        layer_order: layer names bottom to top (default: order in ``model.named_modules()``, else natural).
        thresholds: a :class:`Thresholds` (used as is) or a dict of overrides of the defaults; with a dict (or
            ``None``) that does not set ``conflict_cosine``, ``S`` is the threshold the reports were measured
            with (``ConflictMonitor(threshold=...)``, 0 by default).
        lr: step size of the first-order transference ``lr G_ij / L_j`` (and of the exact lookahead).
        lookahead: a closure returning ``{task: loss}`` of ``model`` on one fixed batch: computes the exact
            lookahead transference for signal 4 and the grouping (needs ``model``).
        max_groups: most task groups considered (default: the number of tasks).
        ema_decay: per-step decay of the EMAs in :attr:`Advice.trends`.
    """
    aligned = align(history)  # once: every part below reads these arrays
    if not aligned.num_steps:
        raise ValueError("the history has no measured step: run some steps under a ConflictMonitor first")
    if not isinstance(thresholds, Thresholds) and "conflict_cosine" not in (thresholds or {}):
        # The run was measured with a conflict threshold (the monitor's `threshold=`): judge it by the same S.
        thresholds = {**(thresholds or {}), "conflict_cosine": aligned.threshold}
    th = Thresholds.from_mapping(thresholds)
    tasks = list(aligned.tasks)
    exact = None
    if lookahead is not None:
        if model is None:
            raise ValueError("lookahead= needs model= (the lookahead steps the model's parameters)")
        exact = lookahead_transference(model, lookahead, lr)
        missing = sorted(set(tasks) - set(exact[0]))
        if missing:
            raise ValueError(f"the lookahead closure returned no loss for task(s) {missing} of the history")
    signals = [
        diverging_objectives(aligned, th),
        heavy_heads(model=model, heads=heads, backbone=backbone, probe=probe, thresholds=th),
        zero_sum(aligned, evaluations=evaluations, higher_is_better=higher_is_better, pairs=evaluation_pairs,
                 thresholds=th),
        single_point_of_risk(aligned, lr=lr, lookahead=exact, thresholds=th),
    ]
    profile = layer_profile(aligned, model=model, layer_order=layer_order, thresholds=th) if aligned.layers else None
    if exact is not None:
        order = [list(exact[0]).index(t) for t in tasks]
        affinity = normalized(np.asarray(exact[1], dtype=np.float64))[np.ix_(order, order)]
    else:
        affinity = normalized(mean_transference(aligned, lr))
    grouping = group_tasks(affinity, tasks, max_groups=max_groups, tolerance=th.group_tolerance)
    unmeasured = no_pair_reason(aligned) if len(tasks) > 1 else None
    counts = aligned.pair_counts()
    never = [f"{a}/{b}" for k, a in enumerate(tasks) for m, b in enumerate(tasks) if k < m and counts[k, m] == 0]

    diverging = signals[0]
    alarms = [s.name for s in signals if s.status == "split"]
    branch = None
    if diverging.status == "split" and profile is not None and profile.branch_point is not None:
        verdict: Verdict = "physical_split"
        branch = profile.branch_point
        reason = (
            f"the objectives diverge ({diverging.evidence.split(';')[0]}) and the layers conflict from "
            f"{branch} up: give each task group its own copy of the backbone from there"
        )
    elif alarms:
        verdict = "lora_split"
        where = (
            "no consistent depth to branch at"
            if "diverging_objectives" in alarms
            else "the gradients do not conflict persistently"
        )
        reason = (
            f"{', '.join(alarms)} say(s) split but {where}: freeze the shared backbone and train one LoRA adapter "
            "per group"
        )
    else:
        verdict = "keep_shared"
        watching = [s.name for s in signals if s.status == "watch"]
        reason = "no signal says split" + (f"; keep an eye on {', '.join(watching)}" if watching else "")
    if unmeasured is not None:
        reason += f"; but that says little: {unmeasured}"
    elif never:
        reason += (
            f"; tasks {', '.join(never)} were never measured together (their affinity counts as neutral in the "
            "grouping): measure steps that carry every task to judge them"
        )
    if verdict == "keep_shared":
        groups = [tasks]
    else:
        groups = grouping.groups if len(grouping.groups) > 1 else [[t] for t in tasks]
    if verdict == "keep_shared" and profile is not None and profile.layers:
        branch_at: str | None = profile.layers[0].name  # the check: fully independent models
        code_groups: list[list[str]] = [[t] for t in tasks]
    else:
        branch_at, code_groups = branch, groups
    return Advice(
        verdict=verdict,
        branch_point=branch,
        groups=groups,
        signals=signals,
        next_step=next_step_code(verdict, branch_at, code_groups, conflict=diverging.status == "split"),
        reason=reason,
        duplicated_share=profile.duplicated_share if branch is not None and profile is not None else 0.0,
        profile=profile,
        grouping=grouping,
        trends=summarize(aligned, decay=ema_decay, threshold=th.conflict_cosine),
    )


def advise_from_jsonl(path: str | Path, **kwargs: Any) -> Advice:
    """:func:`advise` on a history saved with ``History.to_jsonl`` (what ``gradconflict advise RUN.jsonl``
    runs); ``kwargs`` go to :func:`advise`."""
    return advise(History.from_jsonl(path), **kwargs)
