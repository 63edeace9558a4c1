"""The warning signals, each a :class:`Signal` with a value, a threshold, a status and one sentence of evidence a
person can check.

The four signals that the shared backbone is in trouble:

1. :func:`diverging_objectives`: task pairs whose gradients conflict persistently (significantly more often than
   unrelated gradients would, see :mod:`~gradconflict.diagnosis.persistence`), on the whole backbone or on some layers.
2. :func:`heavy_heads`: heads large or deep relative to the backbone, rewriting its features (linear CKA).
3. :func:`zero_sum`: steps whose update works against some task; evaluations that trade one task for another.
4. :func:`single_point_of_risk`: negative transference, a step for one task raising another's loss.

And the two warnings about what a split cannot cure:

5. :func:`oscillating_conflict`: conflict that comes and goes like a coin points to the data (label noise, small
   batches), not to the shared capacity; after a split, the same reading of the split model's run.
6. :func:`ceiling`: a ceiling that does not move when the tasks are split (the comparison experiment, a paired
   test across seeds) means capacity was not the limit.

And one signal for what a re-weighting cures more cheaply than a split:

7. :func:`magnitude_dominance`: one task's gradient an order of magnitude larger than another's on most steps
   (Yu et al.'s "dominating magnitudes"): the smaller task barely moves the shared backbone, aligned or not.

A signal whose input is missing (no model for the heads, a single task, no step that carried two tasks together,
no comparison) has status ``"n/a"`` and its evidence says what to pass or to measure.

Each :class:`Signal` carries typed fields (the status, the headline value and what it measures, the p-value and the
effect size of the test that decides it, the task pairs and the layers it points at, the decisive
:class:`PairFinding`); its evidence is a sentence rendered from those numbers for a person, and nothing reads it
back. Read the fields.

Tasks are tracked by name (:mod:`~gradconflict.diagnosis.aligned`): pairs are named by
:func:`~gradconflict.records.pairs.pair_key` (``"a/b"``, the names sorted), each pair statistic is taken over the
steps that carried both tasks, and the evidence says on how many steps that was when some steps lacked one of them.

>>> import torch
>>> from gradconflict import ConflictReport
>>> fight = ConflictReport("ab", torch.tensor([[1.0, -0.9], [-0.9, 1.0]]), losses=torch.ones(2))
>>> s = diverging_objectives([fight] * 8)
>>> s.status, s.value, s.statistic, s.pairs, s.finding.steps
('split', 1.0, 'persistence', (('a', 'b'),), 8)
>>> single_point_of_risk([fight] * 8).status
'split'
>>> alone = [ConflictReport(t, torch.ones(1, 1), step=s) for s, t in enumerate("abab")]   # round-robin
>>> diverging_objectives(alone).status
'n/a'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats
from torch import nn

from gradconflict.diagnosis.affinity import mean_transference, normalized
from gradconflict.diagnosis.aligned import Aligned, Run, align, masked_mean, no_pair_reason
from gradconflict.diagnosis.conflicts import ConflictTests, conflict_tests
from gradconflict.diagnosis.evaluations import EvalTable, Pairs
from gradconflict.diagnosis.heads import head_stats
from gradconflict.diagnosis.persistence import (
    CHANCE,
    PERSISTENT_RATE,
    autocorrelation_time,
    binomial_tail,
    effect_size,
    minimum_effective_steps,
    signs,
)
from gradconflict.diagnosis.profile import order_layers
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import series, trend
from gradconflict.records.comparison import ComparisonResult, judge_gain, split_gains
from gradconflict.records.pairs import pair_key, pair_words

__all__ = [
    "ALARMS",
    "REWEIGHT",
    "SIGNALS",
    "STATUSES",
    "WARNINGS",
    "PairFinding",
    "Signal",
    "ceiling",
    "diverging_objectives",
    "heavy_heads",
    "magnitude_dominance",
    "oscillating_conflict",
    "single_point_of_risk",
    "worst_status",
    "zero_sum",
]

Status = Literal["n/a", "ok", "watch", "split"]

#: Statuses from the least to the most alarming.
STATUSES: tuple[Status, ...] = ("n/a", "ok", "watch", "split")

#: The four warning signals that the shared backbone is in trouble (each may say ``split``).
ALARMS = ("diverging_objectives", "heavy_heads", "zero_sum", "single_point_of_risk")
#: The two warnings about what a split cannot cure.
WARNINGS = ("oscillating_conflict", "ceiling")
#: The signal a magnitude-aware re-weighting cures (the advice tries the weighting before a split).
REWEIGHT = ("magnitude_dominance",)
#: Every signal's name, in the order :func:`~gradconflict.diagnosis.advise` lists them.
SIGNALS = ALARMS + WARNINGS + REWEIGHT


def worst_status(*statuses: Status) -> Status:
    """The most alarming of ``statuses`` (``"n/a"`` only when all are).

    >>> worst_status("ok", "watch", "n/a")
    'watch'
    """
    return max(statuses, key=STATUSES.index, default="n/a")


@dataclass(frozen=True)
class PairFinding:
    """One pair's conflict test, on the whole backbone (``layer`` None) or on one layer: the numbers behind a
    signal's verdict about that pair (see :mod:`~gradconflict.diagnosis.persistence`).

    Attributes:
        pair: the two task names, sorted.
        layer: the layer, or ``None`` for the whole shared backbone.
        steps: measured steps that carried both tasks (on that layer).
        conflicts: of them, steps with ``C_ij < S``.
        agreements: of them, steps with ``C_ij > -S``.
        rate: ``conflicts / (conflicts + agreements)`` (NaN: never outside the dead zone).
        persistence: ``conflicts / steps``.
        tau: the integrated autocorrelation time (each step counts ``1 / tau``).
        p_value: the one-sided p-value of "conflicts more often than chance" (raw).
        p_adjusted: the same, adjusted over the family of :attr:`family` tests (Benjamini-Hochberg).
        steps_needed: measured steps to add, about, before the test is settled (0 when settled; inf: never).
        threshold: the conflict cosine ``S``.
        family: the number of tests adjusted together.
        outcome: ``"persistent"``, ``"undetermined"`` (more steps could tell) or ``"ruled_out"``.
    """

    pair: tuple[str, str]
    layer: str | None
    steps: int
    conflicts: int
    agreements: int
    rate: float
    persistence: float
    tau: float
    p_value: float
    p_adjusted: float
    steps_needed: float
    threshold: float
    family: int
    outcome: Literal["persistent", "undetermined", "ruled_out"]

    @property
    def where(self) -> str:
        """``"the whole backbone"`` or the layer's name."""
        return "the whole backbone" if self.layer is None else self.layer

    @property
    def effective_steps(self) -> float:
        """``steps / tau``: the independent steps the test counts."""
        return self.steps / self.tau

    @property
    def effect(self) -> float:
        """Cohen's ``h`` of the conflict rate against chance (NaN without a rate)."""
        return float(effect_size(self.rate))

    def sentence(self) -> str:
        """The finding in one sentence (rendered from the fields)."""
        return (
            f"tasks {pair_words(*self.pair)} conflict (cosine < {self.threshold:g}) on "
            f"{self.conflicts / max(self.steps, 1):.0%} of {self.steps} measured steps on {self.where} (p = "
            f"{self.p_adjusted:.2g} against {CHANCE:.0%} for unrelated gradients, adjusted over the {self.family} "
            f"pair tests; {self.effective_steps:.0f} effective steps)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view, the pair as its key; a number that is not finite is ``None``."""
        return {
            "layer": self.layer, "pair": pair_key(*self.pair), "steps": self.steps, "conflicts": self.conflicts,
            "agreements": self.agreements, "rate": _finite_or_none(self.rate),
            "persistence": _finite_or_none(self.persistence), "tau": self.tau,
            "p_value": _finite_or_none(self.p_value), "p_adjusted": _finite_or_none(self.p_adjusted),
            "steps_needed": _finite_or_none(self.steps_needed),
        }


@dataclass(frozen=True)
class Signal:
    """One warning signal: typed fields, and the evidence rendered from them for a person.

    Attributes:
        name: one of :data:`SIGNALS`.
        value: the headline number (``None`` when it could not be measured).
        threshold: the value from which the signal says ``split`` (see :class:`Thresholds`); NaN when there is
            none (the oscillation warning never says split; the ceiling's is the paired test's floor, 1%).
        status: ``"ok"``, ``"watch"``, ``"split"``, or ``"n/a"`` when an input is missing.
        evidence: one sentence a person can check, rendered from the fields (never parsed: read the fields).
        details: the numbers behind the evidence (plain Python, JSON-ready).
        statistic: what :attr:`value` measures (``"persistence"``, ``"head_ratio"``, ``"against_share"``,
            ``"normalized_affinity"``, ``"conflict_rate"``, ``"delta_m"``; empty when ``n/a``).
        p_value: the p-value of the test that decides the status, when one does (adjusted over the family for
            ``diverging_objectives``; the equivalence test at chance for ``oscillating_conflict``); else ``None``.
        effect: the effect size behind the status, when there is one (Cohen's ``h`` of the conflict rate against
            chance); else ``None``.
        pairs: the task pairs the signal points at: names sorted, or ``(from, to)`` for the directed transference of
            ``single_point_of_risk``. ``diverging_objectives``: the pairs in persistent conflict (the decisive one
            first), else the decisive pair; ``oscillating_conflict``: the oscillating pairs.
        layers: the layers the signal points at, bottom to top (``diverging_objectives``: in persistent conflict).
        finding: the decisive pair test (``diverging_objectives``, ``oscillating_conflict``), else ``None``.
    """

    name: str
    value: float | None
    threshold: float
    status: Status
    evidence: str
    details: dict[str, Any] = field(default_factory=dict)
    statistic: str = ""
    p_value: float | None = None
    effect: float | None = None
    pairs: tuple[tuple[str, str], ...] = ()
    layers: tuple[str, ...] = ()
    finding: PairFinding | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (a missing threshold is ``None``; pairs as lists of two names)."""
        return {
            "name": self.name, "value": self.value, "threshold": _finite_or_none(self.threshold),
            "status": self.status, "statistic": self.statistic, "p_value": _finite_or_none(self.p_value),
            "effect": _finite_or_none(self.effect),
            "pairs": [list(p) for p in self.pairs], "layers": list(self.layers),
            "evidence": self.evidence, "details": self.details,
        }

    def __str__(self) -> str:
        value = "-" if self.value is None else f"{self.value:.3g}"
        word = "re-weight below" if self.name in REWEIGHT else "split at"
        split = f" ({word} {self.threshold:.3g})" if math.isfinite(self.threshold) else ""
        return f"[{self.status:>5}] {self.name} = {value}{split}: {self.evidence}"


def _pair_names(tasks: Sequence[str], i: int, j: int) -> str:
    return pair_key(tasks[i], tasks[j])


def _not_available(name: str, threshold: float, why: str) -> Signal:
    return Signal(name, None, threshold, "n/a", why)


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _by_pair(aligned: Aligned, values: np.ndarray) -> dict[str, Any]:
    """``{"a/b": value}`` over the pairs ``i < j`` (NaN as ``None``, JSON-ready)."""
    T, counts = len(aligned.tasks), values.dtype.kind in "iub"
    return {
        _pair_names(aligned.tasks, a, b): int(values[a, b]) if counts else _finite_or_none(values[a, b])
        for a in range(T)
        for b in range(a + 1, T)
    }


def _coverage(aligned: Aligned, i: int, j: int) -> str:
    """``"; tasks a and b were measured together on 12 of 40 measured steps"`` when some steps lacked one of
    them, else nothing."""
    n = int(aligned.pair_counts()[i, j])
    return f"; {aligned.together_phrase(i, j)}" if n < aligned.num_steps else ""


def _pair_steps(aligned: Aligned) -> str:
    """``" (30 of the 40 measured steps carried two tasks or more)"`` when some did not, else nothing."""
    n, total = int(aligned.multi.sum()), aligned.num_steps
    return f" ({n} of the {total} measured steps carried two tasks or more)" if n < total else ""


def _findings(tests: ConflictTests, alpha: float) -> list[PairFinding]:
    """Every measured pair's test, on the whole backbone and then on each layer (in the family's order)."""
    family = tests.family_size
    out = []
    for layer, t in [(None, tests.whole), *zip(tests.layers, tests.by_layer)]:
        persistent, undetermined = t.persistent(alpha), t.undetermined(alpha)
        for p in range(len(tests.pairs)):
            if t.steps[p] > 0:
                out.append(PairFinding(
                    pair=tests.pair(p), layer=layer, steps=int(t.steps[p]), conflicts=int(t.conflicts[p]),
                    agreements=int(t.agreements[p]), rate=float(t.rate[p]), persistence=float(t.persistence[p]),
                    tau=float(t.tau[p]), p_value=float(t.p_conflict[p]), p_adjusted=float(t.p_adjusted[p]),
                    steps_needed=float(t.steps_needed[p]), threshold=tests.threshold, family=family,
                    outcome="persistent" if persistent[p] else "undetermined" if undetermined[p] else "ruled_out",
                ))
    return out


def _more_steps(needed: float, gap: int) -> str:
    """``"measure about 60 more steps"`` (with the training steps at ``every=k``)."""
    n = int(needed)
    return f"measure about {n} more steps" + (f" (about {n * gap} training steps at every={gap})" if gap > 1 else "")


def diverging_objectives(
    history: Run, thresholds: Thresholds | None = None, *, tests: ConflictTests | None = None
) -> Signal:
    """Signal 1: does some pair of tasks conflict persistently, on the whole backbone or on some layers?

    Each pair's conflict rate on the whole backbone and on every layer is tested against chance (the 50% of two
    unrelated gradients; :mod:`~gradconflict.diagnosis.persistence`, one adjusted family): a conflict confined to a
    few layers counts as much as one over the whole backbone. The value is the persistence (share of measured steps
    in conflict) of the decisive pair (:attr:`Signal.finding`); the threshold, the smallest rate that counts
    (Cohen's small effect, :data:`~gradconflict.diagnosis.persistence.PERSISTENT_RATE`).

    ``split`` when some pair conflicts persistently (:attr:`Signal.pairs` and :attr:`Signal.layers` name them);
    ``watch`` when some pair might with more steps (the evidence says about how many), or when the conflict
    fraction rises significantly over training (Mann-Kendall at ``alpha``); ``ok`` when every pair is ruled out.
    ``n/a`` when no measured step carried two tasks together. ``tests`` are the run's
    :func:`~gradconflict.diagnosis.conflicts.conflict_tests` (computed when not given). The mean magnitude
    cancellation is reported as evidence, not judged: it depends on the norms.
    """
    th = thresholds or Thresholds()
    name = "diverging_objectives"
    aligned = align(history)
    threshold = PERSISTENT_RATE
    why = no_pair_reason(aligned)
    if why is not None:
        return _not_available(name, threshold, why)
    tests = tests if tests is not None else conflict_tests(aligned, th.conflict_cosine, th.alpha)
    findings = _findings(tests, th.alpha)
    persistent = [f for f in findings if f.outcome == "persistent"]
    undetermined = [f for f in findings if f.outcome == "undetermined"]
    cancellation = float(aligned.cancellation[aligned.multi].mean())
    t = trend(*series(aligned, "conflict_fraction", th.conflict_cosine))
    rising = t.rising(th.alpha)
    layers: list[str] = []
    if persistent:
        decisive = min(persistent, key=lambda f: (f.p_adjusted, -f.rate))
        status: Status = "split"
        layers = order_layers(f.layer for f in persistent if f.layer is not None)
        pairs = tuple(dict.fromkeys([decisive.pair, *(f.pair for f in persistent)]))
        evidence = f"{decisive.sentence()}: a persistent conflict"
        if layers:
            evidence += f"; layers in persistent conflict: {', '.join(layers)} ({len(layers)} of {len(tests.layers)})"
    elif undetermined:
        decisive = min(undetermined, key=lambda f: f.steps_needed)
        status = "watch"
        pairs = (decisive.pair,)
        evidence = (
            f"no pair conflicts persistently yet; the closest: {decisive.sentence()}; not enough steps yet: "
            f"{_more_steps(decisive.steps_needed, tests.step_gap)} to tell"
        )
    else:
        decisive = max(findings, key=lambda f: float(np.nan_to_num(f.rate, nan=-1.0)))
        status = "watch" if rising else "ok"
        pairs = (decisive.pair,)
        evidence = (
            f"no pair conflicts persistently: every pair's conflict rate is significantly below {threshold:.0%} "
            f"(the most frequent: {decisive.sentence()})"
        )
    i, j = aligned.index(decisive.pair[0]), aligned.index(decisive.pair[1])
    whole = tests.whole
    evidence += (
        f"; the mean magnitude cancellation is {cancellation:.2f}{_pair_steps(aligned)}; the conflict fraction "
        f"{'rises' if rising else 'does not rise significantly'} over training "
        f"(Theil-Sen slope {t.slope:+.2g}/step, Mann-Kendall p = {t.p_value:.2g})"
    )
    counts = aligned.pair_counts()
    others = [(a, b) for a, b in tests.pairs if (a, b) != (i, j)]
    fewer = [
        f"{_pair_names(aligned.tasks, a, b)} {counts[a, b]}" for a, b in others if 0 < counts[a, b] < aligned.num_steps
    ]
    never = [_pair_names(aligned.tasks, a, b) for a, b in others if counts[a, b] == 0]
    evidence += _coverage(aligned, i, j)
    if fewer:
        evidence += f"; pairs measured together on fewer steps: {', '.join(fewer)} of {aligned.num_steps}"
    if never:
        evidence += f"; never measured together: {', '.join(never)}"
    persistence = np.zeros((len(aligned.tasks),) * 2)
    persistence[tuple(np.array(tests.pairs).T)] = whole.persistence
    details = {
        "persistence": _by_pair(aligned, np.where(counts > 0, persistence, np.nan)),
        "together": _by_pair(aligned, counts),
        "decisive": decisive.to_dict(),
        "persistent": [f.to_dict() for f in persistent],
        "undetermined": [f.to_dict() for f in undetermined],
        "tests": tests.family_size,
        "mean_cancellation": cancellation,
        "conflict_trend": {"slope": t.slope, "tau": t.tau, "p_value": t.p_value, "rising": rising},
        "steps": aligned.num_steps,
        "steps_with_pairs": int(aligned.multi.sum()),
    }
    return Signal(
        name, decisive.persistence, threshold, status, evidence, details, statistic="persistence",
        p_value=_finite_or_none(decisive.p_adjusted), effect=_finite_or_none(decisive.effect), pairs=pairs,
        layers=tuple(layers), finding=decisive,
    )


def oscillating_conflict(
    history: Run, thresholds: Thresholds | None = None, *, tests: ConflictTests | None = None
) -> Signal:
    """Warning 5: conflict that keeps oscillating points to the data, not to the shared capacity.

    A pair whose conflict rate on the whole backbone is significantly within the band around chance (40-60%,
    Cohen's small effect; :mod:`~gradconflict.diagnosis.persistence`) and that conflicts persistently on no layer
    flips between conflict and agreement like a coin: what drives it is the noise of the batches and the labels,
    which a split does not remove. On the run of a model *after* a split, the same reading says that the conflict
    kept oscillating after the split. The value is the conflict rate of the oscillating pair that conflicts most;
    its details give each pair's flip rate (the share of consecutive measured steps whose sign changes: about 50%
    for a coin). This warning never says ``split``: ``watch`` when some pair oscillates, ``ok`` otherwise.
    """
    th = thresholds or Thresholds()
    name = "oscillating_conflict"
    aligned = align(history)
    why = no_pair_reason(aligned)
    if why is not None:
        return _not_available(name, math.nan, why)
    tests = tests if tests is not None else conflict_tests(aligned, th.conflict_cosine, th.alpha)
    whole = tests.whole
    persistent_somewhere = whole.persistent(th.alpha).copy()
    for layer in tests.by_layer:
        persistent_somewhere |= layer.persistent(th.alpha)
    oscillating = whole.at_chance(th.alpha) & ~persistent_somewhere
    flips = _flip_rates(aligned, tests)
    names = [tests.pair_name(p) for p in range(len(tests.pairs))]
    details = {
        "oscillating": [n for n, o in zip(names, oscillating) if o],
        "rate": {n: _finite_or_none(float(r)) for n, r in zip(names, whole.rate)},
        "flip_rate": {n: _finite_or_none(float(f)) for n, f in zip(names, flips)},
    }
    if not oscillating.any():
        return Signal(
            name, None, math.nan, "ok",
            "no pair's conflict oscillates at chance level on the whole backbone (each is persistent, ruled out "
            "as agreeing, or not settled yet)",
            details, statistic="conflict_rate",
        )
    p = int(np.argmax(np.where(oscillating, whole.rate, -1.0)))
    finding = next(f for f in _findings(tests, th.alpha) if f.layer is None and f.pair == tests.pair(p))
    pairs = tuple(tests.pair(int(q)) for q in np.flatnonzero(oscillating))
    p_chance = float(whole.p_chance[p])
    evidence = (
        f"tasks {pair_words(*finding.pair)} conflict on {finding.persistence:.0%} of {finding.steps} measured steps, "
        f"within chance of the {CHANCE:.0%} of unrelated gradients (p = {p_chance:.2g}), and their sign flips on "
        f"{flips[p]:.0%} of consecutive steps: the conflict oscillates, {oscillation_cause(pairs)}"
    )
    return Signal(
        name, finding.rate, math.nan, "watch", evidence, details, statistic="conflict_rate",
        p_value=_finite_or_none(p_chance), effect=_finite_or_none(finding.effect), pairs=pairs, finding=finding,
    )


def oscillation_cause(pairs: Sequence[tuple[str, str]]) -> str:
    """What an oscillating conflict points to, and the oscillating pairs when there are several (rendered from
    :attr:`Signal.pairs` of the ``oscillating_conflict`` warning).

    >>> oscillation_cause([("a", "b"), ("a", "c")]).split("; ")[-1]
    'oscillating pairs: a/b, a/c'
    """
    cause = (
        "which points to the data (label noise, small batches), not to the shared capacity; splitting would not "
        "cure it"
    )
    if len(pairs) > 1:
        cause += f"; oscillating pairs: {', '.join(pair_key(*pair) for pair in pairs)}"
    return cause


def _flip_rates(aligned: Aligned, tests: ConflictTests) -> np.ndarray:
    """Per pair, the share of consecutive measured steps (both not tied) whose conflict sign changes."""
    out = np.full(len(tests.pairs), np.nan)
    for p, (i, j) in enumerate(tests.pairs):
        s = signs(aligned.cosine[:, i, j], tests.threshold)
        s = s[s != 0]
        if len(s) > 1:
            out[p] = float((s[1:] != s[:-1]).mean())
    return out


def ceiling(comparison: ComparisonResult | Sequence[ComparisonResult] | None) -> Signal:
    """Warning 6: did splitting lift a ceiling? Read from the comparison experiment
    (:func:`~gradconflict.split.compare`, one result per seed): the Delta-m% of each split variant (independent,
    lora, branched) against the shared model of the same seed, judged by the one ceiling rule,
    :func:`~gradconflict.records.comparison.judge_gain` (through :func:`~gradconflict.records.comparison.split_gains`):
    a one-sided paired t-test across seeds that the mean gain exceeds a floor of
    :data:`~gradconflict.records.comparison.GAIN_FLOOR` (1%).

    ``split`` when the test confirms some split variant's gain above the floor (the value: the best mean gain;
    the threshold: the floor; :attr:`Signal.p_value`: that variant's paired p-value); ``ok`` when it finds no
    gain above the floor for any variant, on two seeds or more whose runs differ: the ceiling did not move, so the
    model's capacity was not the limit and splitting is not the cure. ``watch`` when the comparison cannot tell:
    one seed, seeds that changed nothing (``seeds_vary`` False: identical runs prove nothing), or a gain above the
    floor the test cannot judge (``beyond`` None); the evidence says what to run. ``n/a`` without a comparison.

    Re-weighted shared models (``shared+<method>``, ``compare(weightings=...)``) are the cheaper cure: when one
    beats shared, a split counts only if it also beats that one (the same paired rule on the per-seed differences);
    otherwise the status is ``ok`` and ``details["weighting"]`` names the method to train the shared model with.

    Results branched at several blocks (one ``compare(branch_at=...)`` per block and seed) are grouped by block:
    ``details["by_block"]`` gives each block's branched gain (mean, per seed, paired test), and the status is read
    on the seeds of the block that gains most (``details["branch_at"]``).
    """
    name = "ceiling"
    if comparison is None:
        return _not_available(
            name, math.nan,
            "no comparison experiment given (run the advice's next step, compare() over a few seeds, and pass "
            "comparison=[...] to check whether splitting lifts a ceiling)",
        )
    results = [comparison] if isinstance(comparison, ComparisonResult) else list(comparison)
    by_block: dict[str, dict[str, Any]] = {}
    points = list(dict.fromkeys(str(r.branch_at) for r in results if r.branch_at is not None))
    if len(points) > 1:
        # Branched at several blocks (one compare() per block and seed): judge each block on its own seeds, and
        # read the other variants on the seeds of the block whose branch gains most.
        for point in points:
            gain = split_gains([r for r in results if str(r.branch_at) == point]).get("branched")
            if gain is not None:
                by_block[point] = {"mean": gain.mean, "per_seed": gain.per_seed, "beyond": gain.beyond,
                                   "p_value": _finite_or_none(gain.p_value)}
        top = max(by_block, key=lambda b: by_block[b]["mean"]) if by_block else points[0]
        results = [r for r in results if str(r.branch_at) == top]
    every = split_gains(results)
    gains = {n: g for n, g in every.items() if not n.startswith("shared+")}
    reweighted = {n: g for n, g in every.items() if n.startswith("shared+")}
    if not gains:
        return _not_available(name, math.nan, "the comparison holds no split variant besides shared")
    best = max(gains.values(), key=lambda g: g.mean)
    floor = best.floor

    def described(group: Mapping[str, Any]) -> str:
        return "; ".join(
            f"{g.variant} {g.mean:+.1f}% ({', '.join(f'{x:+.1f}' for x in g.per_seed)}"
            + (f"; p = {g.p_value:.2g}" if math.isfinite(g.p_value) else "") + ")"
            for g in group.values()
        )

    winners = [g.variant for g in gains.values() if g.beyond is True]
    varied = all(g.seeds_vary for g in every.values())
    cure = max((g for g in reweighted.values() if g.beyond is True), key=lambda g: g.mean, default=None)
    details: dict[str, Any] = {
        "gains": {
            g.variant: {
                "mean": g.mean, "per_seed": g.per_seed, "beyond": g.beyond, "p_value": _finite_or_none(g.p_value)
            }
            for g in every.values()
        },
        "spread": _finite_or_none(best.spread),
        "floor": floor,
        "seeds": len(results),
        "seeds_vary": varied,
        "branch_at": results[0].branch_at,
        "groups": results[0].groups,
        "winners": winners,
        "weighting": None,
        "by_block": by_block,
    }
    head = f"Delta-m% against the same seed's shared model over {len(results)} seed(s): {described(gains)}"
    if reweighted:
        head += f"; re-weighted shared models: {described(reweighted)}"
    decisive = next((g for g in gains.values() if g.variant in winners), best)
    status: Status
    if winners and cure is not None:
        # A split counts only if it beats the cheaper cure too: the same paired rule on the per-seed differences.
        split = gains[max(winners, key=lambda n: gains[n].mean)]
        versus = judge_gain([a - b for a, b in zip(split.per_seed, cure.per_seed)], seeds_vary=varied)
        details["split_over_weighting"] = {"variant": split.variant, "mean": versus.mean, "beyond": versus.beyond,
                                           "p_value": _finite_or_none(versus.p_value)}
        if versus.beyond is not True:
            winners = []
            details["winners"], details["weighting"] = [], cure.variant.removeprefix("shared+")
    if winners:
        status = "split"
        evidence = (
            f"{head}; {', '.join(winners)} beat(s) shared by more than {floor:g}% (one-sided paired t-test across "
            "seeds)" + (f", and {cure.variant} too" if cure is not None else "") + ": splitting lifts the ceiling"
        )
    elif not varied or len(results) < 2:
        status = "watch"
        evidence = head + (
            "; the seeds changed nothing (bit-identical runs), so they prove nothing: let compare(seed=...) reach "
            "the model's initialisation and the data order, and rerun"
            if not varied
            else "; with one seed the paired test cannot judge: run compare() over a few more seeds"
        )
    elif cure is not None:
        status = "ok"
        details["weighting"] = cure.variant.removeprefix("shared+")
        evidence = (
            f"{head}; {cure.variant} beats shared by more than {floor:g}% and no split beats it (one-sided paired "
            f"t-tests across seeds): keep the backbone shared and train it with {details['weighting']}"
        )
    elif any(g.beyond is None for g in gains.values()):
        status = "watch"
        evidence = f"{head}; the paired test cannot judge a gain above {floor:g}%: run more seeds"
    else:
        status = "ok"
        evidence = (
            f"{head}; no split variant beats shared by more than {floor:g}% (one-sided paired t-test across "
            "seeds): the ceiling did not move, so capacity was not the limit and splitting is not the cure"
        )
    return Signal(
        name, decisive.mean, floor, status, evidence, details, statistic="delta_m",
        p_value=_finite_or_none(decisive.p_value),
    )


#: The weightings the advice offers first against dominating magnitudes: IMTL-G (Liu et al., 2021) and
#: Aligned-MTL (Senushkin et al., 2023) both equalise the tasks' contributions to the update, whatever their scale
#: (names of :data:`gradconflict.weighting.METHODS`; both need ``pip install 'gradconflict[weighting]'``).
MAGNITUDE_WEIGHTINGS = ("imtl-g", "aligned-mtl")


def update_shares(aligned: Aligned) -> np.ndarray:
    """``[S, T]`` the share of each step's update ``u = sum_j w_j g_j`` along each task's weighted gradient,
    ``w_i <g_i, u> / |u|^2`` (the shares of a step sum to 1), from the Gram; NaN where the task is absent or the
    step carried fewer than two tasks."""
    w = np.where(aligned.present, aligned.weights, 0.0)
    Gw = np.einsum("sij,sj->si", np.nan_to_num(aligned.gram), w)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = w * Gw / np.einsum("si,si->s", w, Gw)[:, None]
    return np.where(aligned.present & aligned.multi[:, None], share, np.nan)


def magnitude_dominance(history: Run, thresholds: Thresholds | None = None) -> Signal:
    """Signal 7: does one task's gradient dominate another's by its magnitude (Yu et al., 2020, "dominating
    magnitudes", one of the tragic triad)? A split is not the only cure, nor the cheapest: a magnitude-aware
    weighting (:data:`MAGNITUDE_WEIGHTINGS`) gives each task its part of the update on the shared backbone.

    For each pair, on each step that carried both, the gradient magnitude similarity ``GMS = 2 |g_i| |g_j| /
    (|g_i|^2 + |g_j|^2)`` (1: equal norms) is compared with ``magnitude_gms`` (0.2: a norm ratio of about 10; see
    :class:`Thresholds`). The pair is *dominated* when GMS is below the cut-off on significantly more than half of
    its steps (a one-sided sign test, the exact binomial test on ``n / tau`` effective steps as in
    :mod:`~gradconflict.diagnosis.persistence`, Benjamini-Hochberg over the pairs) on at least
    :func:`~gradconflict.diagnosis.persistence.minimum_effective_steps` effective steps. The value is the lowest
    median GMS; :attr:`Signal.pairs` the dominated pairs; ``details`` also gives each pair's median norm ratio and
    each task's median share of the update (:func:`update_shares`).

    ``watch`` when some pair is dominated (this signal never says ``split``: the advice offers the re-weighting
    first, as a ``compare()`` variant); ``ok`` otherwise; ``n/a`` when no step carried two tasks.
    """
    th = thresholds or Thresholds()
    name = "magnitude_dominance"
    aligned = align(history)
    why = no_pair_reason(aligned)
    if why is not None:
        return _not_available(name, th.magnitude_gms, why)
    tasks, norms, T = aligned.tasks, aligned.task_norms, len(aligned.tasks)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T) if aligned.pair_counts()[i, j] > 0]
    median_gms, median_ratio, p_raw, enough, larger = [], [], [], [], []
    for i, j in pairs:
        both = aligned.present[:, i] & aligned.present[:, j]
        a, b = norms[both, i], norms[both, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            gms = np.nan_to_num(2 * a * b / (a**2 + b**2), nan=1.0)  # two zero gradients: no dominance
        below = gms < th.magnitude_gms
        tau = autocorrelation_time(np.where(below, 1.0, -1.0))
        n = len(gms) / tau
        p_raw.append(float(binomial_tail(np.array(below.sum() / tau), np.array(n), CHANCE, True)))
        enough.append(n >= minimum_effective_steps(th.alpha))
        median_gms.append(float(np.median(gms)))
        median_ratio.append(float(np.median(np.maximum(a, b) / np.maximum(np.minimum(a, b), 1e-300))))
        larger.append(tasks[i] if np.median(a) >= np.median(b) else tasks[j])
    p_adjusted = stats.false_discovery_control(p_raw, method="bh") if p_raw else np.array([])
    dominated = [k for k in range(len(pairs)) if enough[k] and p_adjusted[k] < th.alpha]
    names = [_pair_names(tasks, i, j) for i, j in pairs]
    with warnings.catch_warnings():  # a task that never met another has no share: NaN, said by the evidence
        warnings.simplefilter("ignore", RuntimeWarning)
        share = np.nanmedian(update_shares(aligned)[aligned.multi], axis=0)
    details: dict[str, Any] = {
        "median_gms": dict(zip(names, median_gms)),
        "median_norm_ratio": dict(zip(names, median_ratio)),
        "larger": dict(zip(names, larger)),
        "p_adjusted": {n: _finite_or_none(float(p)) for n, p in zip(names, p_adjusted)},
        "update_share": {t: _finite_or_none(float(v)) for t, v in zip(tasks, share)},
        "dominated": [names[k] for k in dominated],
        "cut_off": th.magnitude_gms,
    }
    worst = int(np.argmin(median_gms))
    shares = ", ".join(f"{t} {v:.0%}" for t, v in zip(tasks, share) if np.isfinite(v))
    if dominated:
        k = min(dominated, key=lambda q: median_gms[q])
        i, j = pairs[k]
        small = tasks[j] if larger[k] == tasks[i] else tasks[i]
        evidence = (
            f"{larger[k]}'s gradient is {median_ratio[k]:.0f} times {small}'s (median; GMS {median_gms[k]:.2f}, below "
            f"{th.magnitude_gms:g} on significantly more than half the steps, p = {p_adjusted[k]:.2g}): {larger[k]} "
            f"dominates the update (median shares of the update: {shares}); a magnitude-aware weighting "
            f"({', '.join(MAGNITUDE_WEIGHTINGS)}) is the cheaper cure to try before a split"
        )
        return Signal(
            name, median_gms[k], th.magnitude_gms, "watch", evidence, details, statistic="gms",
            p_value=_finite_or_none(float(p_adjusted[k])),
            pairs=tuple(_sorted_pair(tasks, *pairs[q]) for q in dominated),
        )
    evidence = (
        f"no task's gradient dominates another's: the lowest median gradient magnitude similarity is "
        f"{median_gms[worst]:.2f} ({names[worst]}, norm ratio {median_ratio[worst]:.1f}; dominated below "
        f"{th.magnitude_gms:g} on significantly more than half the steps); median shares of the update: {shares}"
    )
    return Signal(name, median_gms[worst], th.magnitude_gms, "ok", evidence, details, statistic="gms",
                  pairs=(_sorted_pair(tasks, *pairs[worst]),))


def _sorted_pair(tasks: Sequence[str], i: int, j: int) -> tuple[str, str]:
    a, b = sorted((tasks[i], tasks[j]))
    return a, b


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
    ``split`` below ``transfer_split``, ``watch`` below ``transfer_watch``; ``n/a`` when no pair of tasks was
    measured together.
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
    status: Status = "split" if value < th.transfer_split else "watch" if value < th.transfer_watch else "ok"
    negative = [f"{tasks[a]}->{tasks[b]}" for a in range(T) for b in range(T) if a != b and Z[a, b] < 0]
    evidence = (
        f"a step on {tasks[i]} alone {'raises' if value < 0 else 'lowers'} {tasks[j]}'s loss by {abs(value):.2f} "
        f"times what a step on {tasks[j]} itself lowers it (transference {Z[i, j]:+.3g}, {method}"
        f"{_coverage(aligned, int(i), int(j)) if aligned is not None else ''}); "
        + (f"negative transference: {', '.join(negative)}" if negative else "no negative transference")
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
    return Signal(
        name, value, th.transfer_split, status, evidence, details, statistic="normalized_affinity",
        pairs=((tasks[i], tasks[j]),),
    )
