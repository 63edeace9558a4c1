"""The warning :func:`ceiling` (signal 6): a ceiling the comparison experiment shows does not move when the tasks
are split."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradconflict.diagnosis.signals.base import (
    Signal,
    Status,
    _finite_or_none,
    _not_available,
)
from gradconflict.records.comparison import ComparisonResult, judge_gain, split_gains

#: The share of the best option's gain a cheaper one must recover to be preferred: a higher branch point over a
#: lower one (the economical branch point), a re-weighted shared model over a split.
RECOVERED_SHARE = 0.8


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
    beats shared, a split counts only if the cure recovers less than :data:`RECOVERED_SHARE` (80%) of its mean gain
    (the rule of the economical branch point: the cheaper option that recovers most of the gain) and the split beats
    the cure too (the same paired rule on the per-seed differences, ``details["split_over_weighting"]``).
    Otherwise ``details["weighting"]`` names the method to train the shared model with, and the status is ``ok``;
    ``watch`` (with ``seeds_needed``) when the cure recovers less than that share and the test cannot tell yet
    whether the split beats it.

    >>> from gradconflict.records.comparison import ComparisonResult, VariantRecord
    >>> def rec(name, loss):
    ...     return VariantRecord(name, {"a": [1.0]}, [(1, {"a": loss})], {"a": "min"})
    >>> runs = [ComparisonResult({"shared": rec("shared", s), "independent": rec("independent", s * 0.5),
    ...                           "shared+imtl-g": rec("shared+imtl-g", s * 0.55)}, ["a"], 1, 0, seed=k)
    ...         for k, s in enumerate([1.0, 1.2, 1.1])]   # independent +50%, the re-weighting +45% (90% of it)
    >>> signal = ceiling(runs)
    >>> signal.status, signal.details["weighting"]
    ('ok', 'imtl-g')

    Results branched at several blocks (one ``compare(branch_at=[...])`` per seed, its copies ``branched@<point>``,
    or one ``compare(branch_at=...)`` per block and seed) are grouped by block: ``details["by_block"]`` gives each
    block's branched gain (mean, per seed, paired test), and the status is read on the seeds of the block that
    gains most among those whose gain the test confirms, else of the block that gains most
    (``details["branch_at"]``; its copy is the variant ``branched`` in ``details["gains"]`` and ``winners``).

    >>> both = [ComparisonResult({"shared": rec("shared", s), "branched@0": rec("branched@0", s * 0.7),
    ...                           "branched@2": rec("branched@2", s * 0.75)}, ["a"], 1, 0, branch_at=[0, 2], seed=k)
    ...         for k, s in enumerate([1.0, 1.2, 1.1])]   # +30% branched at block 0, +25% at block 2
    >>> signal = ceiling(both)
    >>> signal.status, signal.details["branch_at"], signal.details["winners"], sorted(signal.details["by_block"])
    ('split', 0, ['branched'], ['0', '2'])
    """
    name = "ceiling"
    if comparison is None:
        return _not_available(
            name, math.nan,
            "no comparison experiment given (run the advice's next step, compare() over a few seeds, and pass "
            "comparison=[...] to check whether splitting lifts a ceiling)",
        )
    results = _per_block([comparison] if isinstance(comparison, ComparisonResult) else comparison)
    by_block: dict[str, dict[str, Any]] = {}
    points = list(dict.fromkeys(str(r.branch_at) for r in results if r.branch_at is not None))
    if len(points) > 1:
        # Branched at several blocks: judge each block on its own seeds, and read the other variants on the seeds
        # of the block whose branch gains most.
        for point in points:
            gain = split_gains([r for r in results if str(r.branch_at) == point]).get("branched")
            if gain is not None:
                by_block[point] = {"mean": gain.mean, "per_seed": gain.per_seed, "beyond": gain.beyond,
                                   "p_value": _finite_or_none(gain.p_value)}
        # A block whose gain the test confirms shows that a split wins, whatever a block with a larger but
        # unconfirmed mean gain says.
        confirmed = [b for b in by_block if by_block[b]["beyond"] is True] or list(by_block)
        top = max(confirmed, key=lambda b: by_block[b]["mean"]) if by_block else points[0]
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
    undecided_cure = False
    if winners and cure is not None:
        # A split counts only if the cheaper cure does not recover most of its gain and it beats the cure too (the
        # same paired rule on the per-seed differences); a difference the test cannot tell leaves it open.
        split = gains[max(winners, key=lambda n: gains[n].mean)]
        versus = judge_gain([a - b for a, b in zip(split.per_seed, cure.per_seed)], seeds_vary=varied)
        recovered = cure.mean / split.mean
        details["split_over_weighting"] = {"variant": split.variant, "mean": versus.mean, "beyond": versus.beyond,
                                           "p_value": _finite_or_none(versus.p_value), "recovered": recovered}
        if recovered >= RECOVERED_SHARE or versus.beyond is not True:
            winners = []
            details["winners"], details["weighting"] = [], cure.variant.removeprefix("shared+")
            undecided_cure = recovered < RECOVERED_SHARE and versus.beyond is None
            if undecided_cure:
                details["seeds_needed"] = versus.seeds_needed
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
    elif undecided_cure and cure is not None:
        status = "watch"
        versus_gain = details["split_over_weighting"]
        evidence = (
            f"{head}; {cure.variant} beats shared by more than {floor:g}% but recovers only "
            f"{versus_gain['recovered']:.0%} of {versus_gain['variant']}'s gain, and the paired test over "
            f"{len(results)} seeds cannot tell whether {versus_gain['variant']} beats it (by "
            f"{versus_gain['mean']:+.1f}% on average): run more seeds"
            + (f", about {details['seeds_needed']} in all at this spread" if details["seeds_needed"] else "")
        )
    elif cure is not None:
        status = "ok"
        details["weighting"] = cure.variant.removeprefix("shared+")
        recovered = details.get("split_over_weighting", {}).get("recovered")
        evidence = (
            f"{head}; {cure.variant} beats shared by more than {floor:g}% (one-sided paired t-test across seeds) and "
            + (f"recovers {recovered:.0%} of the best split's gain (at least {RECOVERED_SHARE:.0%}), without a copy"
               if recovered is not None and recovered >= RECOVERED_SHARE else "no split beats it (the same test)")
            + f": keep the backbone shared and train it with {details['weighting']}"
        )
    elif any(g.beyond is None for g in gains.values()):
        status = "watch"
        open_gains = [g for g in gains.values() if g.beyond is None]
        needed = [g.seeds_needed for g in open_gains if g.seeds_needed is not None]
        details["seeds_needed"] = min(needed) if needed else None
        evidence = (
            f"{head}; {', '.join(g.variant for g in open_gains)} gain(s) more than {floor:g}% on average, but the "
            f"paired test over {len(results)} seeds cannot tell that from the seed-to-seed spread (no evidence either "
            "way): run more seeds"
            + (f", about {min(needed)} in all at this spread" if needed else "")
        )
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


def _per_block(results: Sequence[ComparisonResult]) -> list[ComparisonResult]:
    """Each result branched at several blocks (``branch_at`` a list, copies ``branched@<point>``) as one result per
    block, its copy named ``branched`` and branched at that block, as ``compare(branch_at=block)`` gives it (the
    other variants the same records); other results as they are."""
    out: list[ComparisonResult] = []
    for result in results:
        if not isinstance(result.branch_at, list):
            out.append(result)
            continue
        copies = {f"branched@{point}": point for point in result.branch_at}
        others = {n: rec for n, rec in result.variants.items() if n not in copies}
        out.extend(
            dataclasses.replace(result, variants={**others, "branched": result.variants[name]}, branch_at=point)
            for name, point in copies.items()
        )
    return out
