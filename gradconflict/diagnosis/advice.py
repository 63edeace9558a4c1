"""The answer to "should we split the shared backbone, where, and into which task groups?", with the evidence.

:func:`advise` reads a run's history (and, optionally, the model, a probe batch, an evaluation table, an exact
lookahead, the results of the comparison experiment) and returns an :class:`Advice`:

- ``physical_split``: some pair of tasks conflicts persistently (signal 1 says ``split``), on the whole backbone
  or only on some layers, and the layer profile finds the depth from which the layers conflict: copy the
  backbone from ``branch_point`` up, one copy per task group. A conflict confined to the upper layers is reason
  enough, however calm the whole backbone looks.
- ``lora_split``: some signal says ``split`` but there is no consistent depth to branch at (or the trouble is
  heavy heads, zero-sum evaluations or negative transference rather than diverging gradients): freeze the
  shared backbone and train one LoRA adapter per group.
- ``keep_shared``: no signal says ``split``; or the comparison experiment shows that no split lifts a ceiling
  (no gain above the 1% floor in a paired test across seeds that vary: capacity was not the limit), or that a
  re-weighted shared model recovers most of the best split's gain, whatever the gradients say; or the conflict
  could not be measured (no step carried two tasks together, as in round-robin training; the reason says what to
  measure).

After a comparison over two seeds or more that vary, the verdict follows it, not the gradients: the split it
confirms (``physical_split`` when a branched or independent variant wins, else ``lora_split``), or
``keep_shared``; a comparison that cannot tell yet keeps the backbone shared, provisionally, and says how many seeds
would settle it (a split must show that it pays for its copies, however persistent the conflict).

Verdict, branch point, groups and next step agree: the groups come from the affinity through the layers from
the branch point up (what the branches would share), and the next step runs exactly the split advised. The
:class:`Uncertainty` says how settled the verdict is: the p-value of the persistent conflict behind a split, or
"not enough steps yet: measure about N more".

Tasks are tracked by name: the diagnosis works on the sorted union of the task names over the measured steps
(:mod:`~gradconflict.diagnosis.aligned`), so the order of the losses dict never changes the advice, and steps
may carry a subset of the tasks (each pair is judged on the steps that carried both). Groups list their tasks in
sorted order, and the groups are sorted by their first task.

>>> import torch
>>> from gradconflict import ConflictReport, LayerReport
>>> fight, agree = torch.tensor([[1.0, -0.8], [-0.8, 1.0]]), torch.tensor([[1.0, 0.9], [0.9, 1.0]])
>>> layers = {"top": LayerReport("top", "ab", fight, num_params=10),
...           "bottom": LayerReport("bottom", "ab", agree * 3, num_params=10)}
>>> run = [ConflictReport("ab", fight + agree * 3, losses=torch.ones(2), layers=layers, step=s) for s in range(12)]
>>> advice = advise(run, layer_order=["bottom", "top"])    # the whole backbone agrees; the top layer does not
>>> advice.verdict, advice.branch_point, advice.groups, advice.uncertainty.decided
('physical_split', 'top', [['a'], ['b']], True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradconflict.diagnosis.advice_types import Advice, DecidedBy, Uncertainty, Verdict, _uncertainty
from gradconflict.diagnosis.affinity import lookahead_transference, mean_transference, normalized
from gradconflict.diagnosis.aligned import Run, align, no_pair_reason
from gradconflict.diagnosis.conflicts import conflict_tests
from gradconflict.diagnosis.evaluations import Pairs
from gradconflict.diagnosis.examples import ConflictingExamples, pairs_with_examples
from gradconflict.diagnosis.groups import Grouping, group_tasks, magnitude_free
from gradconflict.diagnosis.next_step import MAX_CANDIDATES, next_step_code
from gradconflict.diagnosis.profile import Profile, layer_profile, share_from
from gradconflict.diagnosis.recon import recon_layers
from gradconflict.diagnosis.signals import (
    ALARMS,
    MAGNITUDE_WEIGHTINGS,
    REWEIGHT,
    Signal,
    ceiling,
    diverging_objectives,
    heavy_heads,
    magnitude_dominance,
    oscillating_conflict,
    oscillation_cause,
    single_point_of_risk,
    zero_sum,
)
from gradconflict.diagnosis.signals.ceiling import RECOVERED_SHARE
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import summarize
from gradconflict.records.comparison import ComparisonResult
from gradconflict.records.history import EMA_DECAY, History
from gradconflict.records.pairs import pair_key
from gradconflict.records.samples import SampleTally

__all__ = ["Advice", "Uncertainty", "advise", "advise_from_jsonl", "next_step_code"]


def _first_layer(profile: Profile | None, branch: str | None) -> int | None:
    """The position in the profile of the first layer at ``branch`` (a layer's name, or a block's path whose layers
    start with it), or ``None``."""
    if profile is None or branch is None:
        return None
    for k, lp in enumerate(profile.layers):
        if lp.name == branch or lp.name.startswith(branch + "."):
            return k
    return None


def _block_paths(model: nn.Module | None) -> list[str] | None:
    """The model's backbone blocks as :func:`~gradconflict.split.branch` reads them, bottom to top (``None``
    without a model following the split tools' convention)."""
    if model is None:
        return None
    # Lazily: the split floor sits above the diagnosis, and the blocks must be the ones branch() copies.
    from gradconflict.split.model import backbone_blocks

    try:
        return [path for path, _ in backbone_blocks(model)]
    except (TypeError, ValueError):
        return None


def _height(block: str, blocks: list[str] | None, profile: Profile | None) -> int:
    """Position of a branch point, bottom to top: a block index, or the block (else the first profiled layer)
    that a path names; -1 when unknown."""
    if block.isdigit():
        return int(block)
    for k, path in enumerate(blocks or []):
        if block == path or block.startswith(path + "."):
            return k
    layer = _first_layer(profile, block)
    return -1 if layer is None else layer


def _economical(
    by_block: Mapping[str, Mapping[str, Any]], blocks: list[str] | None, profile: Profile | None
) -> str | None:
    """The rule for the economical branch point: among the blocks whose branched gain the paired test confirms,
    the highest one whose mean gain is at least :data:`RECOVERED_SHARE` of the best block's (``None`` without a
    comparison branched at two blocks or more, or when no block's gain is confirmed)."""
    confirmed = {b: v["mean"] for b, v in by_block.items() if v["beyond"] is True}
    if len(by_block) < 2 or not confirmed:
        return None
    best = max(confirmed.values())
    enough = [b for b, gain in confirmed.items() if gain >= RECOVERED_SHARE * best]
    return max(enough, key=lambda b: _height(b, blocks, profile))


def _candidates(onset: str, blocks: list[str] | None, profile: Profile | None) -> list[str]:
    """Branch points to compare, from the conflict onset up: the model's blocks from the onset's (else the
    profiled layers from the onset), at most :data:`MAX_CANDIDATES`, spread evenly with both ends kept."""
    if blocks:
        k = _height(onset, blocks, None)
        above = blocks[k:] if k >= 0 else [onset]
    else:
        first = _first_layer(profile, onset)
        above = [lp.name for lp in profile.layers[first:]] if profile is not None and first is not None else [onset]
    keep = np.unique(np.linspace(0, len(above) - 1, min(MAX_CANDIDATES, len(above))).round().astype(int))
    return [above[int(k)] for k in keep]


def _duplicated_share(model: nn.Module | None, at: str | None) -> float | None:
    """What :func:`~gradconflict.split.branch` copies when branching ``model`` at ``at`` (``None`` when it cannot
    be counted: no model following the convention, or a branch point naming no block)."""
    if model is None or at is None:
        return None
    from gradconflict.split.branch import duplicated_share  # lazily: the split floor sits above the diagnosis

    try:
        return duplicated_share(model, at=at)
    except (TypeError, ValueError):
        return None


def _groups(
    verdict: Verdict, tasks: list[str], affinity: np.ndarray, th: Thresholds, max_groups: int | None
) -> tuple[list[list[str]], Grouping]:
    grouping = group_tasks(
        magnitude_free(affinity), tasks, max_groups=max_groups, tolerance=th.group_tolerance,
        min_groups=2 if verdict != "keep_shared" else 1,
    )
    if verdict == "keep_shared":
        return [tasks], grouping
    return (grouping.groups if len(grouping.groups) > 1 else [[t] for t in tasks]), grouping


def _examples(
    samples: SampleTally | None, oscillating: Signal, measured_ceiling: Signal
) -> list[ConflictingExamples]:
    """The examples that carry the conflict, when a split would not cure it: of the oscillating pairs, or of every
    pair the tally holds when the comparison shows that no ceiling moved (none without attributed steps)."""
    if samples is None or not samples.pairs:
        return []
    if measured_ceiling.status == "ok":
        return pairs_with_examples(samples)
    if oscillating.status == "watch":
        return pairs_with_examples(samples, oscillating.pairs)
    return []


def advise(
    history: Run,
    *,
    model: nn.Module | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    backbone: nn.Module | None = None,
    probe: Any = None,
    evaluations: Sequence[Mapping[str, float]] | Any = None,
    directions: Mapping[str, str] | None = None,
    evaluation_pairs: Pairs = "consecutive",
    layer_order: Sequence[str] | None = None,
    thresholds: Thresholds | Mapping[str, Any] | None = None,
    lr: float = 1.0,
    lookahead: Callable[[], Mapping[str, Tensor]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    comparison: ComparisonResult | Sequence[ComparisonResult] | None = None,
    recon_k: int | None = None,
    recon_window: tuple[int, int] | None = None,
    max_groups: int | None = None,
    ema_decay: float = EMA_DECAY,
    samples: SampleTally | None = None,
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
        backbone: the backbone module (default ``model.backbone``); also the shared parameters of the lookahead.
        probe: a batch for ``model(probe)``: measures how much each head rewrites the backbone's features.
        evaluations: per-task metrics across evaluations or runs (list of dicts or DataFrame) for signal 3.
        directions: ``{metric: "max" | "min"}``, the direction of each evaluation metric (required with
            ``evaluations``: no metric is assumed to be higher-is-better).
        evaluation_pairs: ``"consecutive"`` (evaluations over time) or ``"all"`` (unordered runs).
        layer_order: layer names bottom to top (default: order in ``model.named_modules()``, else the run's own
            layer order, :attr:`History.layer_order <gradconflict.History.layer_order>`, which a saved run keeps).
        thresholds: a :class:`Thresholds` (used as is) or a dict of overrides of the defaults; with a dict (or
            ``None``) that does not set ``conflict_cosine``, ``S`` is the threshold the reports were measured
            with (``ConflictMonitor(threshold=...)``, 0 by default).
        lr: step size of the first-order transference ``lr G_ij / L_j`` (and of the exact lookahead's SGD step).
        lookahead: a closure returning ``{task: loss}`` of ``model`` on one fixed batch: computes TAG's exact
            lookahead transference on the shared parameters for signal 4 and the grouping (needs ``model``).
        optimizer: the run's optimizer, for the lookahead's step (TAG steps with the run's optimizer).
        comparison: the comparison experiment's results (:func:`~gradconflict.split.compare`, one per seed): the
            ``ceiling`` signal; over seeds that vary, the verdict follows it whatever the gradients say (a split
            when the paired test confirms one, ``keep_shared`` otherwise, provisional while it cannot tell).
        recon_k: how many layers Recon's selection names (default: the layers in persistent conflict).
        recon_window: first and last training step whose measurements Recon scores (default: all).
        max_groups: most task groups considered (default: the number of tasks).
        ema_decay: per-step decay of the EMAs in :attr:`Advice.trends`.
        samples: the run's per-example tally (default: ``history.samples`` of a
            :class:`~gradconflict.History`), from the steps measured with ``sample_ids``: when the conflict
            oscillates or the comparison shows that no ceiling moved, :attr:`Advice.examples` names the examples
            that carry it (:mod:`~gradconflict.diagnosis.examples`).
    """
    aligned = align(history)  # once: every part below reads these arrays
    if samples is None and isinstance(history, History):
        samples = history.samples
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
            raise ValueError("lookahead= needs model= (the lookahead steps the model's shared parameters)")
        exact = lookahead_transference(model, lookahead, lr, shared=backbone, optimizer=optimizer)
        missing = sorted(set(tasks) - set(exact[0]))
        if missing:
            raise ValueError(f"the lookahead closure returned no loss for task(s) {missing} of the history")
    tests = conflict_tests(aligned, th.conflict_cosine, th.alpha)
    signals = [
        diverging_objectives(aligned, th, tests=tests),
        heavy_heads(model=model, heads=heads, backbone=backbone, probe=probe, thresholds=th),
        zero_sum(aligned, evaluations=evaluations, directions=directions, pairs=evaluation_pairs, thresholds=th),
        single_point_of_risk(aligned, lr=lr, lookahead=exact, thresholds=th),
        oscillating_conflict(aligned, th, tests=tests),
        ceiling(comparison),
        magnitude_dominance(aligned, th),
    ]
    by_name = {s.name: s for s in signals}
    diverging, oscillating, measured_ceiling, dominance = (
        by_name["diverging_objectives"], by_name["oscillating_conflict"], by_name["ceiling"],
        by_name["magnitude_dominance"],
    )
    weighting = None
    measured_groups: list[list[str]] | None = None  # the groups of the split a comparison confirmed
    profile = (
        layer_profile(aligned, model=model, layer_order=layer_order, thresholds=th, tests=tests)
        if aligned.layers else None
    )
    branch = profile.branch_point if profile is not None else None
    alarms = [name for name in ALARMS if by_name[name].status == "split"]
    verdict: Verdict
    decided_by: DecidedBy
    # A comparison over seeds that vary measures what the gradients only point at: the verdict follows it. A
    # comparison that cannot tell keeps the backbone shared, provisionally: a split must show that it pays.
    compared = measured_ceiling.details.get("seeds_vary") is True and measured_ceiling.details.get("seeds", 0) > 1
    if measured_ceiling.status == "ok" or (measured_ceiling.status == "watch" and compared):
        verdict, branch, decided_by = "keep_shared", None, "ceiling"
        reason = measured_ceiling.evidence
        weighting = measured_ceiling.details.get("weighting")
        if measured_ceiling.status == "watch":
            reason += "; until it can, keep the backbone shared (a split must show that it pays for its copies)"
        if alarms:
            reason += f" (although {', '.join(alarms)} say(s) split)"
    elif measured_ceiling.status == "split":
        winners = measured_ceiling.details["winners"]
        decided_by = "ceiling"
        # The groups follow the comparison too: the branched variant's when it won, else one per task when
        # fully independent models did.
        alone = [[t] for t in tasks] if "independent" in winners else None
        if "branched" in winners and measured_ceiling.details["branch_at"] is not None:
            verdict, branch = "physical_split", str(measured_ceiling.details["branch_at"])
            measured_groups = measured_ceiling.details.get("groups") or alone
        elif alone is not None and profile is not None and profile.layers:
            verdict, branch, measured_groups = "physical_split", profile.layers[0].name, alone
        else:
            verdict, branch = "lora_split", None
        reason = measured_ceiling.evidence
    elif diverging.status == "split" and branch is not None and diverging.finding is not None:
        verdict, decided_by = "physical_split", "diverging"
        reason = (
            f"{diverging.finding.sentence()}: the layers conflict persistently from {branch} up; give each task "
            "group its own copy of the backbone from there"
        )
    elif alarms:
        verdict, branch = "lora_split", None
        decided_by = "diverging" if "diverging_objectives" in alarms else "heuristics"
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
        verdict, branch, decided_by = "keep_shared", None, "none"
        watching = [
            s.name for s in signals if s.status == "watch" and s.name not in ("oscillating_conflict", *REWEIGHT)
        ]
        reason = "no signal says split" + (f"; keep an eye on {', '.join(watching)}" if watching else "")
        if oscillating.status == "watch":
            reason += f"; {oscillation_cause(oscillating.pairs)}: the conflict oscillates"
            if samples is None or not samples.pairs:
                reason += " (pass sample_ids= to monitor.backward to name the examples that carry it)"
        if dominance.status == "watch":
            dominated = ", ".join(pair_key(*p) for p in dominance.pairs)
            if measured_ceiling.status == "n/a":  # the cheap cure to try, until a comparison measures it
                weighting = MAGNITUDE_WEIGHTINGS[0]
            reason += (
                f"; but one task's gradient dominates by its magnitude ({dominated}): try a magnitude-aware "
                f"weighting first ({', '.join(MAGNITUDE_WEIGHTINGS)}, in the next step's comparison), and split only "
                "if the comparison shows a split beating it"
            )
    onset = profile.branch_point if profile is not None else None
    blocks = _block_paths(model)
    candidates: list[str] = []
    if verdict == "physical_split" and branch is not None:
        by_block = measured_ceiling.details.get("by_block") or {}
        economical = _economical(by_block, blocks, profile)
        if economical is not None:
            branch = economical
            reason += (
                f"; the economical branch point is {economical}: the highest block whose branched gain recovers "
                f"{RECOVERED_SHARE:.0%} of the best block's"
            )
        elif not by_block:
            candidates = _candidates(branch, blocks, profile)
    elif verdict == "keep_shared" and measured_ceiling.status == "n/a":
        # Capacity is invisible to gradients and may run short at any depth: the next step branches at blocks
        # from the bottom up, beside the fully independent models.
        bottom = blocks[0] if blocks else profile.layers[0].name if profile is not None and profile.layers else None
        candidates = _candidates(bottom, blocks, profile) if bottom is not None else []
    unmeasured = no_pair_reason(aligned) if len(tasks) > 1 else None
    counts = aligned.pair_counts()
    never = [pair_key(a, b) for k, a in enumerate(tasks) for m, b in enumerate(tasks) if k < m and counts[k, m] == 0]
    if unmeasured is not None:
        reason += f"; but that says little: {unmeasured}"
    elif never:
        reason += (
            f"; tasks {', '.join(never)} were never measured together (their affinity counts as neutral in the "
            "grouping): measure steps that carry every task to judge them"
        )
    start = _first_layer(profile, branch) if verdict == "physical_split" else None
    if exact is not None:
        order = [list(exact[0]).index(t) for t in tasks]
        affinity = normalized(np.asarray(exact[1], dtype=np.float64))[np.ix_(order, order)]
    elif profile is not None and start is not None:
        affinity = normalized(mean_transference(aligned, lr, layers=[lp.name for lp in profile.layers[start:]]))
    else:
        affinity = normalized(mean_transference(aligned, lr))
    groups, grouping = _groups(verdict, tasks, affinity, th, max_groups)
    if measured_groups is not None:
        groups = [list(g) for g in measured_groups]
    if verdict == "keep_shared":
        code_groups: list[list[str]] = [[t] for t in tasks]  # the check: fully independent models
    else:
        code_groups = groups
    recon = None
    if profile is not None:
        k = recon_k if recon_k is not None else sum(lp.status == "conflict" for lp in profile.layers)
        recon = recon_layers(aligned, k, threshold=th.conflict_cosine, window=recon_window)
    share = _duplicated_share(model, branch) if verdict == "physical_split" and blocks else None
    if share is None:
        share = 0.0 if profile is None else share_from(profile.layers, start)
    return Advice(
        verdict=verdict,
        branch_point=branch,
        groups=groups,
        signals=signals,
        next_step=next_step_code(
            verdict, candidates if len(candidates) > 1 or verdict == "keep_shared" and candidates else branch,
            code_groups,
            conflict=diverging.status == "split",
            reweight=dominance.status == "watch", steps=int(aligned.steps.max()) + 1,
            lr=float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
        ),
        reason=reason,
        uncertainty=_uncertainty(decided_by, diverging, alarms, aligned.step_gap, measured_ceiling),
        duplicated_share=share,
        profile=profile,
        recon=recon,
        grouping=grouping,
        trends=summarize(aligned, decay=ema_decay, threshold=th.conflict_cosine),
        decided_by=decided_by,
        weighting=weighting,
        conflict_onset=onset,
        examples=_examples(samples, oscillating, measured_ceiling),
    )


def advise_from_jsonl(path: str | Path, **kwargs: Any) -> Advice:
    """:func:`advise` on a history saved with ``History.to_jsonl`` or a ``JSONLSink`` (what ``gradconflict advise
    RUN.jsonl`` runs), with the per-example tally of its steps measured with ``sample_ids``; ``kwargs`` go to
    :func:`advise`."""
    return advise(History.from_jsonl(path), **kwargs)
