"""The signals read from the persistence of conflict: :func:`diverging_objectives` (signal 1) and the warning
:func:`oscillating_conflict` (signal 5), with :func:`oscillation_cause`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradconflict.diagnosis.aligned import Aligned, Run, align, no_pair_reason
from gradconflict.diagnosis.conflicts import ConflictTests, conflict_tests
from gradconflict.diagnosis.persistence import (
    CHANCE,
    PERSISTENT_RATE,
    signs,
)
from gradconflict.diagnosis.profile import order_layers
from gradconflict.diagnosis.signals.base import (
    Signal,
    Status,
    _by_pair,
    _coverage,
    _findings,
    _finite_or_none,
    _more_steps,
    _not_available,
    _pair_names,
    _pair_steps,
)
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import series, trend
from gradconflict.records.pairs import pair_key, pair_words


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
    for p, cosine in enumerate(aligned.cosine_pairs(tests.pairs).T):  # one pass over the steps for every pair
        s = signs(cosine, tests.threshold)
        s = s[s != 0]
        if len(s) > 1:
            out[p] = float((s[1:] != s[:-1]).mean())
    return out
