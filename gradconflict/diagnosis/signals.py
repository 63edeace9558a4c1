"""The four warning signals of DESIGN.md section 1, each a :class:`Signal` with a value, a threshold, a status
and one sentence of evidence a person can check.

1. :func:`diverging_objectives`: task pairs whose gradients conflict on most steps, and magnitude cancellation.
2. :func:`heavy_heads`: heads large or deep relative to the backbone, rewriting its features (linear CKA).
3. :func:`zero_sum`: steps whose update works against some task; evaluations that trade one task for another.
4. :func:`single_point_of_risk`: negative transference, a step for one task raising another's loss.

A signal whose input is missing (no model for the heads, a single task) has status ``"n/a"`` and its evidence
says what to pass.

>>> import torch
>>> from gradconflict import ConflictReport
>>> fight = ConflictReport("ab", torch.tensor([[1.0, -0.9], [-0.9, 1.0]]), losses=torch.ones(2))
>>> s = diverging_objectives([fight] * 5)
>>> s.status, s.value
('split', 1.0)
>>> single_point_of_risk([fight] * 5).status
'split'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from gradconflict import metrics
from gradconflict.diagnosis.affinity import mean_transference, normalized
from gradconflict.diagnosis.evaluations import EvalTable, Pairs
from gradconflict.diagnosis.heads import head_stats
from gradconflict.diagnosis.profile import worst_pair
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import Reports, measured_reports, series, trend

__all__ = [
    "STATUSES",
    "Signal",
    "diverging_objectives",
    "heavy_heads",
    "single_point_of_risk",
    "worst_status",
    "zero_sum",
]

Status = Literal["n/a", "ok", "watch", "split"]

#: Statuses from the least to the most alarming.
STATUSES: tuple[Status, ...] = ("n/a", "ok", "watch", "split")


def worst_status(*statuses: Status) -> Status:
    """The most alarming of ``statuses`` (``"n/a"`` only when all are).

    >>> worst_status("ok", "watch", "n/a")
    'watch'
    """
    return max(statuses, key=STATUSES.index, default="n/a")


@dataclass(frozen=True)
class Signal:
    """One warning signal.

    Attributes:
        name: ``diverging_objectives``, ``heavy_heads``, ``zero_sum`` or ``single_point_of_risk``.
        value: the headline number (``None`` when it could not be measured).
        threshold: the value from which the signal says ``split`` (see :class:`Thresholds`).
        status: ``"ok"``, ``"watch"``, ``"split"``, or ``"n/a"`` when an input is missing.
        evidence: one sentence a person can check.
        details: the numbers behind the evidence (plain Python, JSON-ready).
    """

    name: str
    value: float | None
    threshold: float
    status: Status
    evidence: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view."""
        return {
            "name": self.name, "value": self.value, "threshold": self.threshold, "status": self.status,
            "evidence": self.evidence, "details": self.details,
        }

    def __str__(self) -> str:
        value = "-" if self.value is None else f"{self.value:.3g}"
        return f"[{self.status:>5}] {self.name} = {value} (split at {self.threshold:g}): {self.evidence}"


def _pair_names(tasks: Sequence[str], i: int, j: int) -> str:
    return f"{tasks[i]}/{tasks[j]}"


def _not_available(name: str, threshold: float, why: str) -> Signal:
    return Signal(name, None, threshold, "n/a", why)


def diverging_objectives(history: Reports, thresholds: Thresholds | None = None) -> Signal:
    """Signal 1: the persistence of conflicting pairs (share of measured steps with ``C_ij < S``, per pair) and
    the mean magnitude cancellation.

    ``split`` when the worst pair's persistence reaches ``persistence_split`` and the mean cancellation
    ``cancellation_split``; ``watch`` when either reaches its ``watch`` level or when the conflict fraction
    rises significantly over training (Mann-Kendall at ``trend_alpha``).
    """
    th = thresholds or Thresholds()
    name = "diverging_objectives"
    reports = measured_reports(history)
    if not reports or len(reports[0].tasks) < 2:
        return _not_available(name, th.persistence_split, "needs at least two tasks and one measured step")
    tasks = reports[0].tasks
    conflicts = torch.stack([metrics.conflict_pairs(r.gram, th.conflict_cosine).cpu() for r in reports])
    persistence = conflicts.double().mean(0).numpy()
    i, j = worst_pair(persistence, torch.stack([r.cosine.double().cpu() for r in reports]).mean(0).numpy())
    worst = float(persistence[i, j])
    cancellation = float(np.mean([float(r.cancellation) for r in reports]))
    t = trend(*series(reports, "conflict_fraction", th.conflict_cosine))
    rising = t.rising(th.trend_alpha)
    if worst >= th.persistence_split and cancellation >= th.cancellation_split:
        status: Status = "split"
    elif worst >= th.persistence_watch or cancellation >= th.cancellation_watch or rising:
        status = "watch"
    else:
        status = "ok"
    evidence = (
        f"tasks {tasks[i]} and {tasks[j]} conflict (cosine < {th.conflict_cosine:g}) on {worst:.0%} of "
        f"{len(reports)} measured steps; the mean magnitude cancellation is {cancellation:.2f}; the conflict "
        f"fraction {'rises' if rising else 'does not rise significantly'} over training "
        f"(Theil-Sen slope {t.slope:+.2g}/step, Mann-Kendall p = {t.p_value:.2g})"
    )
    T = len(tasks)
    details = {
        "persistence": {_pair_names(tasks, a, b): float(persistence[a, b]) for a in range(T) for b in range(a + 1, T)},
        "mean_cancellation": cancellation,
        "conflict_trend": {"slope": t.slope, "tau": t.tau, "p_value": t.p_value, "rising": rising},
        "steps": len(reports),
    }
    return Signal(name, worst, th.persistence_split, status, evidence, details)


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
    return Signal(name, heaviest.ratio, th.head_ratio_split, status, evidence, details)


def _grade(value: float, watch: float, split: float) -> Status:
    return "split" if value >= split else "watch" if value >= watch else "ok"


def zero_sum(
    history: Reports,
    *,
    evaluations: Sequence[Mapping[str, float]] | Any = None,
    higher_is_better: Mapping[str, bool] | None = None,
    pairs: Pairs = "consecutive",
    thresholds: Thresholds | None = None,
) -> Signal:
    """Signal 3: at gradient level, the share of measured steps whose combined update works against some task
    (``alignment_i < 0``, the value); at evaluation level (with ``evaluations``, see
    :class:`~gradconflict.diagnosis.evaluations.EvalTable`), the share of changes that trade one task for
    another, and the Pareto front. The status is the worse of the two levels.
    """
    th = thresholds or Thresholds()
    name = "zero_sum"
    reports = measured_reports(history)
    if not reports or len(reports[0].tasks) < 2:
        return _not_available(name, th.against_split, "needs at least two tasks and one measured step")
    tasks = reports[0].tasks
    against = np.array([(r.alignment < 0).cpu().numpy() for r in reports])  # [steps, T]
    share = float(against.any(1).mean())
    victim = int(np.argmax(against.mean(0)))
    status = _grade(share, th.against_watch, th.against_split)
    evidence = f"the combined update works against some task on {share:.0%} of {len(reports)} measured steps" + (
        f" (most often {tasks[victim]}, {against.mean(0)[victim]:.0%})" if share > 0 else ""
    )
    details: dict[str, Any] = {
        "against_share": share,
        "against_by_task": dict(zip(tasks, against.mean(0).tolist())),
    }
    if evaluations is not None:
        table = EvalTable.from_rows(evaluations, higher_is_better)
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
    return Signal(name, share, th.against_split, status, evidence, details)


def single_point_of_risk(
    history: Reports,
    *,
    lr: float = 1.0,
    lookahead: tuple[Sequence[str], np.ndarray] | None = None,
    thresholds: Thresholds | None = None,
) -> Signal:
    """Signal 4: negative transference. The value is the lowest normalised affinity ``N_ij = Z_ij / Z_jj``
    (``i != j``): how much a step on task ``i`` lowers task ``j``'s loss compared with a step on ``j`` itself.

    ``Z`` is the first-order transference ``lr G_ij / L_j`` averaged over the measured steps, or the exact
    ``lookahead`` result ``(tasks, Z)`` of :func:`~gradconflict.diagnosis.affinity.lookahead_transference`.
    ``split`` below ``transfer_split``, ``watch`` below ``transfer_watch``.
    """
    th = thresholds or Thresholds()
    name = "single_point_of_risk"
    reports = measured_reports(history)
    if lookahead is not None:
        tasks, Z, method = tuple(lookahead[0]), np.asarray(lookahead[1], dtype=np.float64), "exact lookahead"
    elif reports:
        tasks, Z, method = reports[0].tasks, mean_transference(reports, lr), f"first order from G, lr={lr:g}"
    else:
        return _not_available(name, th.transfer_split, "needs one measured step (or an exact lookahead)")
    T = len(tasks)
    if T < 2:
        return _not_available(name, th.transfer_split, "needs at least two tasks")
    N = normalized(Z)
    off = N + np.diag(np.full(T, np.inf))
    i, j = np.unravel_index(int(np.argmin(off)), off.shape)
    value = float(N[i, j])
    status: Status = "split" if value < th.transfer_split else "watch" if value < th.transfer_watch else "ok"
    negative = [f"{tasks[a]}->{tasks[b]}" for a in range(T) for b in range(T) if a != b and Z[a, b] < 0]
    evidence = (
        f"a step on {tasks[i]} alone {'raises' if value < 0 else 'lowers'} {tasks[j]}'s loss by {abs(value):.2f} "
        f"times what a step on {tasks[j]} itself lowers it (transference {Z[i, j]:+.3g}, {method}); "
        + (f"negative transference: {', '.join(negative)}" if negative else "no negative transference")
    )
    details = {
        "method": method,
        "transference": Z.tolist(),
        "normalized": N.tolist(),
        "negative_pairs": negative,
        "tasks": list(tasks),
    }
    return Signal(name, value, th.transfer_split, status, evidence, details)
