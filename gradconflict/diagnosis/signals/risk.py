"""The signals read from the heads, the updates and the transference: :func:`heavy_heads` (signal 2),
:func:`zero_sum` (signal 3) and :func:`single_point_of_risk` (signal 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from torch import nn

from gradconflict.diagnosis.affinity import mean_transference, normalized
from gradconflict.diagnosis.aligned import Aligned, Run, align, masked_mean, no_pair_reason
from gradconflict.diagnosis.evaluations import EvalTable, Pairs
from gradconflict.diagnosis.heads import head_stats
from gradconflict.diagnosis.persistence import autocorrelation_time, minimum_effective_steps
from gradconflict.diagnosis.signals.base import (
    Signal,
    Status,
    _by_pair,
    _coverage,
    _finite_or_none,
    _not_available,
    _pair_steps,
    worst_status,
)
from gradconflict.diagnosis.thresholds import Thresholds


def heavy_heads(
    *,
    model: nn.Module | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    backbone: nn.Module | None = None,
    probe: Any = None,
    thresholds: Thresholds | None = None,
) -> Signal:
    """Signal 2: head-to-backbone parameter ratio, head depth and (with ``probe``) how much each head rewrites
    the backbone's features, as the linear CKA between the backbone's output and the head's last hidden layer.

    ``heads`` and ``backbone`` default to ``model.heads`` and ``model.backbone``. ``split`` when a head is at
    least ``head_ratio_split`` times the backbone and its CKA is below ``cka_split``; ``watch`` when a head's
    ratio reaches ``head_ratio_watch``, its depth ``head_depth_watch``, or its CKA is below ``cka_watch``.
    """
    th = thresholds or Thresholds()
    name = "heavy_heads"
    heads = heads if heads is not None else getattr(model, "heads", None)
    backbone = backbone if backbone is not None else getattr(model, "backbone", None)
    if heads is None or backbone is None or not len(heads):
        return _not_available(
            name, th.head_ratio_split,
            "not measured: pass heads= (task -> module) and backbone=, or a model with .heads and .backbone",
        )
    stats = head_stats(dict(heads.items()), backbone, model=model, probe=probe)
    heaviest = max(stats, key=lambda s: s.ratio)
    measured = [s for s in stats if s.cka is not None]
    rewrites = min(measured, key=lambda s: s.cka or 0.0) if measured else None
    split = any(s.ratio >= th.head_ratio_split and s.cka is not None and s.cka < th.cka_split for s in stats)
    watch = any(
        s.ratio >= th.head_ratio_watch or s.depth >= th.head_depth_watch or (s.cka is not None and s.cka < th.cka_watch)
        for s in stats
    )
    status: Status = "split" if split else "watch" if watch else "ok"
    evidence = (
        f"the heaviest head, {heaviest.task}, has {heaviest.num_params} parameters ({heaviest.ratio:.2f}x the "
        f"backbone) in {heaviest.depth} layer(s); "
        + (
            f"the head that rewrites most, {rewrites.task}, has CKA {rewrites.cka:.2f} between the backbone output "
            "and its last hidden layer"
            if rewrites is not None
            else "feature rewriting not measured (pass probe=, a batch of inputs for model(probe))"
        )
    )
    details = {
        "heads": {
            s.task: {"num_params": s.num_params, "ratio": s.ratio, "depth": s.depth, "cka": s.cka} for s in stats
        },
        "backbone_params": sum(p.numel() for p in backbone.parameters()),
    }
    return Signal(name, heaviest.ratio, th.head_ratio_split, status, evidence, details, statistic="head_ratio")


def _grade(value: float, watch: float, split: float) -> Status:
    return "split" if value >= split else "watch" if value >= watch else "ok"


def zero_sum(
    history: Run,
    *,
    evaluations: Sequence[Mapping[str, float]] | Any = None,
    directions: Mapping[str, str] | None = None,
    pairs: Pairs = "consecutive",
    thresholds: Thresholds | None = None,
) -> Signal:
    """Signal 3: at gradient level, the share of the measured steps carrying two tasks or more whose combined
    update works against some task (``alignment_i < 0``, the value); at evaluation level (with ``evaluations``
    and the ``directions`` of their metrics, ``{metric: "max" | "min"}``, see
    :class:`~gradconflict.diagnosis.evaluations.EvalTable`), the share of changes that trade one task for another,
    and the Pareto front. The status is the worse of the two levels.

    Without a step carrying two tasks, the gradient level is not measured (the value is ``None``): the signal is
    ``n/a``, or the evaluation level alone when ``evaluations`` are given.
    """
    th = thresholds or Thresholds()
    name = "zero_sum"
    aligned = align(history)
    why = no_pair_reason(aligned)
    if why is not None and evaluations is None:
        return _not_available(name, th.against_split, why)
    tasks = aligned.tasks
    details: dict[str, Any] = {}
    value: float | None = None
    status: Status = "n/a"
    if why is None:
        steps = aligned.multi
        carried = aligned.present & steps[:, None]  # [S, T]: the task's alignment is defined
        against = (aligned.alignment < 0) & carried
        share = float(against[steps].any(1).mean())
        by_task = masked_mean(against.astype(np.float64), carried)  # NaN: the task never met another
        victim = int(np.argmax(np.where(np.isnan(by_task), -1.0, by_task)))
        value, status = share, _grade(share, th.against_watch, th.against_split)
        evidence = (
            f"the combined update works against some task on {share:.0%} of {int(steps.sum())} measured steps"
            + (f" (most often {tasks[victim]}, {by_task[victim]:.0%})" if share > 0 else "")
            + _pair_steps(aligned)
        )
        details.update(
            against_share=share,
            against_by_task={t: _finite_or_none(v) for t, v in zip(tasks, by_task.tolist())},
            steps_with_pairs=int(steps.sum()),
        )
    else:
        evidence = f"gradient level not measured: {why}"
    if evaluations is not None:
        table = EvalTable.from_rows(evaluations, directions or {})
        traded = table.trade_off_share(th.eval_tolerance, pairs)
        front = table.pareto_front()
        status = worst_status(status, _grade(traded, th.zero_sum_watch, th.zero_sum_split))
        evidence += (
            f"; {traded:.0%} of {len(table.changes(pairs))} evaluation changes improve one metric by more than "
            f"{th.eval_tolerance:.0%} while another regresses by more, and {len(front)} of {len(table.values)} "
            "evaluations are on the Pareto front"
        )
        details.update(evaluation_trade_off_share=traded, pareto_front=front, metrics=list(table.metrics))
    else:
        evidence += "; no evaluation table given (pass evaluations= for the evaluation-level test)"
    return Signal(
        name, value, th.against_split, status, evidence, details, statistic="against_share" if value is not None else ""
    )


def single_point_of_risk(
    history: Run,
    *,
    lr: float = 1.0,
    lookahead: tuple[Sequence[str], np.ndarray] | None = None,
    thresholds: Thresholds | None = None,
) -> Signal:
    """Signal 4: negative transference. The value is the lowest normalised affinity ``N_ij = Z_ij / Z_jj``
    (``i != j``): how much a step on task ``i`` lowers task ``j``'s loss compared with a step on ``j`` itself.

    ``Z`` is the first-order transference ``lr G_ij / L_j`` averaged over the measured steps that carried both
    tasks, or the exact ``lookahead`` result ``(tasks, Z)`` of
    :func:`~gradconflict.diagnosis.affinity.lookahead_transference` (put in sorted task order).
    ``watch`` below ``transfer_watch``; ``split`` below ``transfer_split`` when the evidence holds: from the
    first-order transference, some pair below ``transfer_split`` must have a mean significantly below zero (a
    one-sided t-test of its per-step values on ``n / tau`` effective steps, at least
    :func:`~gradconflict.diagnosis.persistence.minimum_effective_steps`, Benjamini-Hochberg over those pairs at
    ``alpha``), so that a mean carried by one or two steps of a long run, or a single step, says ``watch``; an
    exact lookahead is taken as measured. ``n/a`` when no pair of tasks was measured together.

    >>> import torch
    >>> from gradconflict import ConflictReport
    >>> hurt = [ConflictReport("ab", torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), step=s) for s in range(8)]
    >>> single_point_of_risk(hurt).status, single_point_of_risk(hurt[:1]).status  # eight steps; one
    ('split', 'watch')
    """
    th = thresholds or Thresholds()
    name = "single_point_of_risk"
    aligned: Aligned | None = None
    if lookahead is not None:
        names = [str(t) for t in lookahead[0]]
        order = sorted(range(len(names)), key=names.__getitem__)
        tasks = tuple(names[k] for k in order)
        Z = np.asarray(lookahead[1], dtype=np.float64)[np.ix_(order, order)]
        method = "exact lookahead"
    else:
        aligned = align(history)
        if not aligned.num_steps:
            return _not_available(name, th.transfer_split, "needs one measured step (or an exact lookahead)")
        why = no_pair_reason(aligned)
        if why is not None:
            return _not_available(name, th.transfer_split, why)
        tasks, Z, method = aligned.tasks, mean_transference(aligned, lr), f"first order from G, lr={lr:g}"
    T = len(tasks)
    if T < 2:
        return _not_available(name, th.transfer_split, "needs at least two tasks")
    N = normalized(Z)
    off = np.where(np.eye(T, dtype=bool) | np.isnan(N), np.inf, N)
    i, j = np.unravel_index(int(np.argmin(off)), off.shape)
    value = float(N[i, j])
    below = [(a, b) for a in range(T) for b in range(T) if a != b and off[a, b] < th.transfer_split]
    p_adjusted = _negative_mean_p(aligned, lr, below, th.alpha) if aligned is not None else np.zeros(len(below))
    significant = bool(np.any(p_adjusted < th.alpha))
    status: Status = "split" if significant else "watch" if value < th.transfer_watch or below else "ok"
    negative = [f"{tasks[a]}->{tasks[b]}" for a in range(T) for b in range(T) if a != b and Z[a, b] < 0]
    evidence = (
        f"a step on {tasks[i]} alone {'raises' if value < 0 else 'lowers'} {tasks[j]}'s loss by {abs(value):.2f} "
        f"times what a step on {tasks[j]} itself lowers it (transference {Z[i, j]:+.3g}, {method}"
        f"{_coverage(aligned, int(i), int(j)) if aligned is not None else ''}); "
        + (f"negative transference: {', '.join(negative)}" if negative else "no negative transference")
    )
    if below and aligned is not None:
        k = int(np.argmin(p_adjusted))
        evidence += (
            f"; the mean of {tasks[below[k][0]]}->{tasks[below[k][1]]} is significantly below 0 (p = "
            f"{p_adjusted[k]:.2g}, one-sided t-test on the effective steps, adjusted)"
            if significant else
            f"; no such mean is significantly below 0 (lowest p = {p_adjusted[k]:.2g}, one-sided t-test on the "
            "effective steps, adjusted): a few steps carry it, so this says watch, not split"
        )
    details: dict[str, Any] = {
        "method": method,
        "transference": [[_finite_or_none(v) for v in row] for row in Z.tolist()],
        "normalized": [[_finite_or_none(v) for v in row] for row in N.tolist()],
        "negative_pairs": negative,
        "tasks": list(tasks),
    }
    if aligned is not None:
        details["together"] = _by_pair(aligned, aligned.pair_counts())
        details["p_adjusted"] = {f"{tasks[a]}->{tasks[b]}": float(p) for (a, b), p in zip(below, p_adjusted)}
    return Signal(
        name, value, th.transfer_split, status, evidence, details, statistic="normalized_affinity",
        pairs=((tasks[i], tasks[j]),),
    )


def _negative_mean_p(
    aligned: Aligned, lr: float, pairs: Sequence[tuple[int, int]], alpha: float
) -> np.ndarray:
    """For each directed pair ``(i, j)``, the one-sided p-value that the mean of its per-step transference
    ``Z_ij`` is below zero: a t-test on ``n / tau`` effective steps (``tau`` the series' autocorrelation time), 1
    on fewer than :func:`~gradconflict.diagnosis.persistence.minimum_effective_steps` (``alpha``); Benjamini-Hochberg
    adjusted over ``pairs``. A mean carried by one outlying step has a t statistic near -1: not significant."""
    if not pairs:
        return np.zeros(0)
    p_raw = []
    for series in aligned.transference_pairs(pairs, lr).T:
        z = series[np.isfinite(series)]
        n = len(z) / autocorrelation_time(z)
        if n < minimum_effective_steps(alpha) or z.mean() >= 0:
            p_raw.append(1.0)
            continue
        spread = z.std(ddof=1)
        t = z.mean() / (spread / np.sqrt(n)) if spread > 0 else -np.inf
        p_raw.append(float(stats.t.cdf(t, df=n - 1)))
    return np.asarray(stats.false_discovery_control(p_raw, method="bh"))
