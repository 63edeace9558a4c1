"""The types of the advice: the :class:`Advice` (verdict, branch point, groups, evidence), its :class:`Uncertainty`
(how settled the verdict is) and how that uncertainty is worked out from the persistence test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gradconflict._strict_json import strict
from gradconflict.diagnosis.examples import ConflictingExamples
from gradconflict.diagnosis.groups import Grouping
from gradconflict.diagnosis.persistence import CHANCE, PERSISTENT_RATE
from gradconflict.diagnosis.profile import Profile
from gradconflict.diagnosis.recon import ReconSelection
from gradconflict.diagnosis.signals import (
    WARNINGS,
    PairFinding,
    Signal,
)
from gradconflict.diagnosis.trends import QuantitySummary
from gradconflict.records.pairs import pair_key, pair_words

Verdict = Literal["keep_shared", "lora_split", "physical_split"]
DecidedBy = Literal["ceiling", "diverging", "heuristics", "none"]


@dataclass(frozen=True)
class Uncertainty:
    """How settled a verdict is.

    Attributes:
        decided: False when more measured steps could still change the verdict (or nothing could be measured).
        statement: one sentence: what settles the verdict, or what to measure.
        p_value: the adjusted p-value of the persistent conflict behind a split (``None`` otherwise).
        steps_needed: measured steps to add, about, before the verdict is settled (``None`` when decided).
        training_steps_needed: the same in training steps (``steps_needed`` times ``k`` under ``every=k``).
        awaits: what would settle a provisional verdict: ``"steps"`` (more measured steps, for the persistence
            tests), ``"comparison"`` (the comparison experiment over seeds that vary: ``next_step``), ``"seeds"``
            (the comparison given, rerun on more seeds: it could not tell); empty when decided. A ``keep_shared``
            with ``awaits == ("comparison",)`` is *provisional on capacity*: the gradients show no persistent
            conflict, and only the comparison can tell whether the shared backbone is too small for the tasks.
    """

    decided: bool
    statement: str
    p_value: float | None = None
    steps_needed: int | None = None
    training_steps_needed: int | None = None
    awaits: tuple[str, ...] = ()

    def __str__(self) -> str:
        return ("decided: " if self.decided else "provisional: ") + self.statement


@dataclass
class Advice:
    """Whether, where and how to split the shared backbone, with the evidence.

    Attributes:
        verdict: ``"keep_shared"``, ``"lora_split"`` or ``"physical_split"``.
        branch_point: the economical block from which the backbone becomes task-specific (``physical_split``
            only): with a comparison branched at several blocks, the highest block whose branched gain is confirmed
            by the paired test and recovers at least :data:`.RECOVERED_SHARE` (80%) of the best block's gain; without
            one, :attr:`conflict_onset` (and ``next_step`` compares the candidate blocks from there up).
        groups: the task groups that should share a backbone (copy or adapter); one group for ``keep_shared``.
        signals: the :class:`~gradconflict.diagnosis.signals.Signal` s: the four warning signals, then the two
            warnings about what a split cannot cure (oscillating conflict, an unmoved ceiling). Look one up by
            name with :meth:`signal` (or :attr:`by_name`), not by position.
        next_step: Python code running the comparison experiment that checks this advice.
        reason: one sentence on why this verdict.
        uncertainty: how settled the verdict is (:class:`Uncertainty`).
        duplicated_share: share of the profiled backbone parameters a physical split at ``branch_point``
            duplicates (0 otherwise).
        profile: the layer conflict profile (``None`` when the reports have no layers).
        recon: Recon's top-K layers next to the branch point (``None`` without layers).
        grouping: the task grouping search (best partition per number of groups, with scores).
        trends: a summary (mean, EMA, windows, trend) of each aggregated quantity.
        decided_by: what decided the verdict: ``"ceiling"`` (the comparison experiment over seeds that vary; the
            verdict stays provisional while it cannot tell), ``"diverging"`` (a persistent conflict, signal 1),
            ``"heuristics"`` (other signals that say split) or ``"none"`` (no signal says split).
        conflict_onset: the layer where the persistent conflict starts (the profile's branch point; ``None``
            without one). Without a comparison branched at several blocks, ``branch_point`` is this layer.
        weighting: the update rule to train the shared model with (a :data:`gradconflict.weighting.METHODS`
            name), when the comparison showed a re-weighted shared model beating shared and no split beating it,
            or recovering at least :data:`~gradconflict.diagnosis.signals.ceiling.RECOVERED_SHARE` (80%) of the best
            split's gain (provisional while the test cannot tell whether a split beats it); before any comparison,
            the first of :data:`~gradconflict.diagnosis.signals.magnitude.MAGNITUDE_WEIGHTINGS` when one task's
            gradient dominates by its magnitude and no signal says split (provisional: the next step's comparison
            measures it against the split); else ``None``.
        examples: the examples that carry the conflict, per pair (:class:`~gradconflict.diagnosis.examples.
            ConflictingExamples`: the ids, the share of the negative inner product they carry, the what-if of
            removing or halving them), when a split would not cure the conflict: for the oscillating pairs, or for
            every attributed pair when the comparison shows that no ceiling moved. Only for a run measured with
            ``sample_ids``; empty otherwise.
    """

    verdict: Verdict
    branch_point: str | None
    groups: list[list[str]]
    signals: list[Signal]
    next_step: str
    reason: str
    uncertainty: Uncertainty
    duplicated_share: float = 0.0
    profile: Profile | None = None
    recon: ReconSelection | None = None
    grouping: Grouping | None = None
    trends: dict[str, QuantitySummary] = field(default_factory=dict)
    decided_by: DecidedBy = "none"
    weighting: str | None = None
    conflict_onset: str | None = None
    examples: list[ConflictingExamples] = field(default_factory=list)

    @property
    def by_name(self) -> dict[str, Signal]:
        """The signals keyed by name (see :data:`~gradconflict.diagnosis.signals.SIGNALS`)."""
        return {s.name: s for s in self.signals}

    def signal(self, name: str) -> Signal:
        """The signal called ``name``; ``KeyError`` naming the signals for any other name."""
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"no signal {name!r}; the signals are {[s.name for s in self.signals]}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view; a value that could not be measured (NaN: a pair never measured
        together) is ``None``."""
        u = self.uncertainty
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "decided_by": self.decided_by,
            "weighting": self.weighting,
            "branch_point": self.branch_point,
            "conflict_onset": self.conflict_onset,
            "groups": self.groups,
            "reason": self.reason,
            "uncertainty": {
                "decided": u.decided, "statement": u.statement, "p_value": u.p_value,
                "steps_needed": u.steps_needed, "training_steps_needed": u.training_steps_needed,
                "awaits": list(u.awaits),
            },
            "duplicated_share": self.duplicated_share,
            "signals": [s.to_dict() for s in self.signals],
            "examples": [e.to_dict() for e in self.examples],
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
                "alpha": self.profile.alpha,
                "layers": [
                    {"name": lp.name, "num_params": lp.num_params, "steps": lp.steps, "score": lp.score,
                     "status": lp.status, "worst_persistence": lp.worst_persistence,
                     "persistence": lp.persistence.tolist(), "mean_cosine": lp.mean_cosine.tolist(),
                     "together": None if lp.together is None else lp.together.tolist(),
                     "p_adjusted": None if lp.tests is None else lp.tests.p_adjusted.tolist(),
                     "tau": None if lp.tests is None else lp.tests.tau.tolist()}
                    for lp in self.profile.layers
                ],
            }
        if self.recon is not None:
            out["recon"] = {
                "layers": self.recon.layers, "scores": self.recon.scores, "k": self.recon.k,
                "window": list(self.recon.window),
            }
        if self.grouping is not None:
            out["grouping"] = {
                "method": self.grouping.method,
                "by_count": {str(k): {"groups": g, "score": s} for k, (g, s) in self.grouping.by_count.items()},
            }
        return strict(out)

    def summary(self) -> str:
        """The verdict and the evidence behind it in a few lines: the uncertainty, which layers conflict and how
        persistently, the branch point and Recon's layers, which warning about what a split cannot cure
        applies, and the examples that carry the conflict then (:attr:`examples`).

        >>> import torch
        >>> from gradconflict import ConflictReport, advise
        >>> fight = ConflictReport("ab", torch.tensor([[1.0, -0.9], [-0.9, 1.0]]), losses=torch.ones(2))
        >>> print(advise([fight] * 8).summary().splitlines()[1][:62])
        how persistent: tasks a/b conflict on 100% of 8 measured steps
        """
        trained = f", the shared model trained with {self.weighting}" if self.weighting else ""
        lines = [f"verdict: {self.verdict}{trained} ({self.uncertainty})"]
        decisive = self.signal("diverging_objectives").finding
        if decisive is not None:
            lines.append(
                f"how persistent: tasks {pair_key(*decisive.pair)} conflict on {decisive.persistence:.0%} of "
                f"{decisive.steps} measured steps on {decisive.where} (conflict rate {decisive.rate:.0%} against "
                f"{CHANCE:.0%} for unrelated gradients; {decisive.effective_steps:.0f} effective steps)"
            )
        if self.profile is not None:
            conflicting = [lp.name for lp in self.profile.layers if lp.status == "conflict"]
            lines.append(
                "layers in persistent conflict: " + (", ".join(conflicting) if conflicting else "none")
                + (f"; branch point {self.branch_point} (duplicates {self.duplicated_share:.0%} of the backbone)"
                   if self.branch_point is not None else "")
            )
        if self.recon is not None and self.recon.layers:
            lines.append(f"Recon's top-{self.recon.k} layers: {', '.join(self.recon.layers)}")
        lines.append("groups: " + " | ".join("[" + ", ".join(g) + "]" for g in self.groups))
        warnings = [self.signal(name) for name in WARNINGS if name in self.by_name]
        lines += [f"warning {s.name} [{s.status}]: {s.evidence}" for s in warnings if s.status != "n/a"]
        if all(s.status == "n/a" for s in warnings) or not any(s.status != "ok" for s in warnings):
            lines.append(
                "warnings: the conflict does not oscillate at chance"
                + ("; no comparison experiment yet (run the next step)" if self.signal("ceiling").status == "n/a"
                   else "")
            )
        lines += [f"examples: {e.sentence()}" for e in self.examples]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The verdict box, the signals, the profile and the groups as HTML tables for Jupyter, those of the HTML report
        (:mod:`gradconflict.reporting.notebook`)."""
        from gradconflict.reporting.notebook import advice_html

        return advice_html(self)

    def __str__(self) -> str:
        trained = f", the shared model trained with {self.weighting}" if self.weighting else ""
        lines = [f"verdict: {self.verdict}{trained} ({self.uncertainty})"]
        if self.branch_point is not None:
            lines.append(
                f"branch point: {self.branch_point} (duplicates {self.duplicated_share:.0%} of the profiled "
                "backbone parameters)"
            )
        lines.append("groups: " + " | ".join("[" + ", ".join(g) + "]" for g in self.groups))
        lines += [f"why: {self.reason}", "", "signals:"]
        lines += [f"  {s}" for s in self.signals]
        if self.examples:
            lines += ["", "examples that carry the conflict (sample_ids; ranked by within-example agreement):"]
            lines += [f"  {pair_key(*e.pair)}: {e.sentence()}" for e in self.examples]
        if self.profile is not None:
            lines += ["", "layer conflict profile (bottom to top; p: persistent conflict against chance):"]
            lines += ["  " + row for row in self.profile.table().splitlines()]
        if self.recon is not None:
            lines += [
                "",
                f"Recon's top-{self.recon.k} layers (S-conflict score over steps {self.recon.window[0]}.."
                f"{self.recon.window[1]}): " + (", ".join(f"{n} ({self.recon.scores[n]})" for n in self.recon.layers)
                                                or "none"),
            ]
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


def _more_steps(d: PairFinding, gap: int) -> Uncertainty | None:
    """What the persistence test of the closest undetermined pair still asks for (``None`` when it is settled)."""
    if d.outcome != "undetermined":
        return None
    if not math.isfinite(d.steps_needed):  # no number of steps would settle it at this rate
        return Uncertainty(
            False, f"tasks {pair_key(*d.pair)} on {d.where} sit on the edge of a persistent conflict",
            awaits=("comparison",),
        )
    n = int(d.steps_needed)
    return Uncertainty(
        False,
        f"not enough steps yet: measure about {n} more steps"
        + (f" ({n * gap} training steps at every={gap})" if gap > 1 else "")
        + f" to tell whether tasks {pair_words(*d.pair)} conflict persistently on {d.where} "
        f"({d.persistence:.0%} of {d.steps} steps so far, {d.effective_steps:.1f} effective steps)",
        steps_needed=n,
        training_steps_needed=n * gap,
        awaits=("steps", "comparison"),
    )


def _uncertainty(
    verdict_from: DecidedBy, diverging: Signal, alarms: Sequence[str], gap: int, ceiling: Signal | None = None
) -> Uncertainty:
    """How settled the verdict is, from what decided it (``gap``: training steps between measured steps).

    Decided only by the comparison over seeds that vary, or by the persistence tests on enough effective steps (a
    persistent conflict behind a split); heuristic signals alone, an unsettled test, a comparison that could not
    tell (``ceiling`` watching: more seeds settle it), or gradients that show no conflict (capacity is then
    unjudged) leave the verdict provisional, with what would settle it."""
    if verdict_from == "ceiling" and ceiling is not None and ceiling.status != "watch":
        return Uncertainty(True, "measured: the comparison experiment's paired test over seeds that vary decided it")
    d = diverging.finding
    if verdict_from == "diverging" and d is not None:
        return Uncertainty(
            True,
            f"tasks {pair_words(*d.pair)} conflict persistently on {d.where} (p = {d.p_adjusted:.2g}, adjusted over "
            f"{d.family} pair tests, on {d.effective_steps:.0f} effective steps)",
            p_value=d.p_adjusted,
        )
    if ceiling is not None and ceiling.status == "watch":
        seeds, needed = ceiling.details.get("seeds"), ceiling.details.get("seeds_needed")
        versus = ceiling.details.get("split_over_weighting") if ceiling.details.get("weighting") else None
        what, gain = (
            (f"{versus['variant']} beats the shared model trained with {ceiling.details['weighting']}", versus["mean"])
            if versus is not None else ("a split beats the shared model", ceiling.value)
        )
        return Uncertainty(
            False,
            f"the comparison experiment over {seeds} seed(s) could not tell whether {what} "
            + (f"(a gain of {gain:+.1f}% on average, within the seed-to-seed spread): rerun it on about "
               f"{needed} seeds in all" if needed else "(see the ceiling signal): rerun it on more seeds that vary"),
            awaits=("seeds",),
        )
    if diverging.status == "n/a" or d is None:
        return Uncertainty(
            False, f"the conflict could not be measured: {diverging.evidence}", awaits=("steps", "comparison")
        )
    more = _more_steps(d, gap)
    if verdict_from == "heuristics":
        statement = (
            f"only heuristic thresholds say split ({', '.join(alarms)}), not a test: the comparison experiment "
            "(next_step, over seeds that vary) confirms or rejects it"
        )
        if more is not None:
            return Uncertainty(
                False, f"{statement}; {more.statement}", steps_needed=more.steps_needed,
                training_steps_needed=more.training_steps_needed, awaits=more.awaits,
            )
        return Uncertainty(False, statement, awaits=("comparison",))
    if more is not None:  # no signal says split, but the gradients cannot rule a conflict out yet
        return Uncertainty(
            False, f"{more.statement}; and capacity (a backbone too small for the tasks) is invisible to gradients "
            "whatever they show: only the comparison experiment can judge it (next_step, shared against "
            "independent and branched models)",
            steps_needed=more.steps_needed, training_steps_needed=more.training_steps_needed, awaits=more.awaits,
        )
    return Uncertainty(
        False,
        f"provisional on capacity: every pair's conflict rate is significantly below a persistent conflict's "
        f"({PERSISTENT_RATE:.0%}) or its conflict weaker than small, so the gradients show no conflict; but "
        "capacity (a backbone too small for the tasks) is invisible to gradients and only the comparison "
        "experiment can judge it: run next_step (shared against independent and branched models)",
        awaits=("comparison",),
    )
