"""The gain test, the package's one rule for a ceiling: :func:`judge_gain` (a paired, one-sided test across seeds
with a floor on the effect) and its :class:`GainTest`, and :func:`split_gains`, which applies it to each variant
of the comparison experiment across seeds (:class:`SplitGain`)."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scipy import stats

from gradconflict.records.measures import delta_m

if TYPE_CHECKING:
    from gradconflict.records.comparison import ComparisonResult, Evaluation, VariantRecord

#: The smallest gain that counts, in percent (Delta-m% points, or a task's mean relative improvement): a split
#: that lifts the tasks by less is not worth its copies, however consistent, and a difference in the fourth digit
#: is no gain.
GAIN_FLOOR = 1.0
#: The level of the one-sided paired test of :func:`judge_gain`: the conventional 5% halved, because a comparison
#: is read again when its first seeds cannot tell (the next step's looks: on the seeds planned from the first,
#: then on :data:`MAX_SEEDS`). Readings at 5% would call a split that gains no more than the floor a win 8.9% of
#: the time; at 2.5% each, 4.7% (a simulation of the next step's looks at the floor, in the tests).
GAIN_ALPHA = 0.025


class IdenticalSeedsWarning(UserWarning):
    """Runs meant as different seeds are bit-identical: the seed reaches neither the model nor the data (a model
    factory that seeds itself, fixed batches), so they measure no seed-to-seed variation."""


@dataclass(frozen=True)
class GainTest:
    """The ceiling rule's verdict on one gain measured over seeds (see :func:`judge_gain`).

    Attributes:
        per_seed: the gain on each seed, in percent (positive: the split is better).
        mean: their mean.
        p_value: the one-sided paired t-test's p-value for "the mean gain exceeds ``floor``" (NaN: not tested).
        floor: the smallest gain that counts.
        alpha: the test's level.
        seeds_vary: False when the seeds changed nothing (identical runs): their agreement proves nothing.
        beyond: True: a gain beyond the floor, confirmed by the test; False: no gain beyond the floor (the mean
            gain is not above it, or too little above it for its spread: :data:`MAX_SEEDS` seeds did not confirm
            it, or would confirm it less than half the time, even at the low end of the spread's confidence
            interval); ``None``: cannot tell (an unconfirmed mean above the floor that more seeds would settle, one
            seed, or seeds that change nothing).
        seeds_needed: when the test cannot tell a mean above the floor, the seeds in all at which it would confirm
            a gain of this mean and spread with :data:`PLAN_POWER` (80%), at most :data:`MAX_SEEDS` (``None``: not
            needed).

    >>> judge_gain([25.5, 26.0, 29.4]).beyond
    True
    """

    per_seed: list[float]
    mean: float
    p_value: float
    floor: float
    alpha: float
    seeds_vary: bool
    beyond: bool | None
    seeds_needed: int | None = None


def judge_gain(
    per_seed: Sequence[float], *, floor: float = GAIN_FLOOR, alpha: float = GAIN_ALPHA, seeds_vary: bool = True
) -> GainTest:
    """The one ceiling rule: does a split (or any variant) beat the shared model?

    ``per_seed`` holds one paired gain per seed, in percent: the variant against the shared model of the *same*
    seed, trained on the same batches (Delta-m% for a model, a task's mean relative improvement for one task).
    The rule:

    - the mean gain must exceed ``floor`` (:data:`GAIN_FLOOR`, 1%): a smaller gain never counts (``False``);
    - and a one-sided one-sample t-test of the per-seed gains against the floor (H0: mean gain <= floor, the
      paired test of the two variants' seed-by-seed results) must reject at ``alpha`` (:data:`GAIN_ALPHA`,
      0.025: half the usual 5%, since a comparison whose first seeds cannot tell is read again on more), on at
      least two seeds whose runs differ: then ``True``.
    - When the mean exceeds the floor but the test does not reject, a failure to confirm is not evidence of no
      gain: ``None`` (cannot tell) when a practical number of seeds would confirm a gain of this mean and spread
      (:attr:`GainTest.seeds_needed`, planned for 80% power, at most :data:`MAX_SEEDS`), ``False`` when that
      many seeds did not confirm it, or when even that many would confirm it less than half the time, were the
      spread as small as its 90% confidence interval allows (the gain is too small for its noise to be worth a
      split; a spread measured on few seeds is a rough estimate, so "no gain" is not read from its point value).
    - ``None`` also when there is one seed only, or when the seeds change nothing (``seeds_vary=False``: the
      caller found the runs of different seeds bit-identical, see :func:`seeds_vary`). Identical runs have no
      spread, and would make any gain look certain.

    Three seeds that agree (+25.5, +26.0, +29.4%) pass. +60.7, +35.3, +18.4% (p = 0.047) cannot be told yet at
    the 2.5% level (:data:`GAIN_ALPHA`: a comparison may be read again): 5 seeds would confirm a gain of this mean
    and spread 80% of the time. +6, -4, +2% is no gain worth a split (+0.3% above the floor at a spread of 5%); a
    gain large on one seed and negative on the others (+40, -5, -3%) cannot be told on three seeds, nor can +12.4,
    +13.8, +64.6% (11 seeds would confirm it).

    >>> t = judge_gain([60.7, 35.3, 18.4])
    >>> t.beyond, round(t.p_value, 3), t.seeds_needed
    (None, 0.047, 5)
    >>> judge_gain([6.0, -4.0, 2.0]).beyond, judge_gain([0.0004, 0.0003, 0.0005]).beyond
    (False, False)
    >>> judge_gain([40.0, -5.0, -3.0]).beyond, judge_gain([40.0, -5.0, -3.0]).seeds_needed
    (None, 20)
    >>> t = judge_gain([12.4, 13.8, 64.6])
    >>> t.beyond, round(t.p_value, 2), t.seeds_needed
    (None, 0.12, 11)
    >>> judge_gain([12.0]).beyond, judge_gain([12.0, 12.5, 12.2], seeds_vary=False).beyond  # one seed; identical runs
    (None, None)
    """
    values = [float(v) for v in per_seed]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"judge_gain needs one finite gain per seed, got {values}")
    mean = statistics.fmean(values)
    p_value = math.nan
    if mean <= floor + 1e-9 * max(1.0, abs(floor)):  # at the floor to rounding: no gain beyond it
        beyond: bool | None = False
    elif len(values) < 2 or not seeds_vary:
        beyond = None
    else:
        if len(set(values)) == 1:
            p_value = 0.0  # the same gain on every seed: the t statistic is infinite
        else:
            with warnings.catch_warnings():  # nearly equal gains: scipy warns of precision, the verdict stands
                warnings.simplefilter("ignore", RuntimeWarning)
                p_value = float(stats.ttest_1samp(values, floor, alternative="greater").pvalue)
        beyond = True if p_value < alpha else None
    needed = None
    if beyond is None and mean > floor and seeds_vary and len(values) > 1:
        # unconfirmed: undecided when a practical number of seeds would confirm a gain this size, else no gain
        needed = _seeds_needed(values, floor, alpha)
        beyond = None if needed is not None else False
    return GainTest(values, mean, p_value, floor, alpha, seeds_vary, beyond, needed)


#: The most seeds :attr:`GainTest.seeds_needed` proposes: a gain that not even this many would confirm half the
#: time, at the low end of its spread's interval (:data:`SPREAD_CONFIDENCE`), is too small for its spread to count
#: (:func:`judge_gain` says ``False``), and so is one that this many seeds did not confirm.
MAX_SEEDS = 20
#: The confidence of the lower bound on the gains' spread at which "too small for its spread" is judged: a spread
#: measured on three seeds may be three times too large (its 90% interval), and "no gain" must hold at the low end.
SPREAD_CONFIDENCE = 0.9
#: The power :attr:`GainTest.seeds_needed` plans for: the chance that the test confirms a gain of the observed mean
#: and spread on that many seeds (80%, the usual planning convention). Planning at the observed effect itself would
#: give even odds, and a second look short of significance about half the time.
PLAN_POWER = 0.8


def _power(effect: float, n: int, alpha: float) -> float:
    """The chance that :func:`judge_gain`'s one-sided t-test on ``n`` seeds rejects when the true gain exceeds the
    floor by ``effect`` standard deviations (the noncentral t distribution)."""
    return float(stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, effect * math.sqrt(n)))


def _seeds_needed(values: Sequence[float], floor: float, alpha: float) -> int | None:
    """The seeds in all at which the one-sided t-test of :func:`judge_gain` confirms a gain of this mean and
    standard deviation with :data:`PLAN_POWER` (at most :data:`MAX_SEEDS`); ``None`` when :data:`MAX_SEEDS` seeds
    were run, or when even that many would confirm it less than half the time, at the low end of the standard
    deviation's one-sided :data:`SPREAD_CONFIDENCE` interval (the chi-squared bound; what to run next, planned from
    the seeds run: not a verdict)."""
    n = len(values)
    if n < 2:
        return None
    if n >= MAX_SEEDS:  # the most seeds the plan runs did not confirm it: no gain worth a split
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    least_sd = sd * math.sqrt((n - 1) / stats.chi2.ppf(SPREAD_CONFIDENCE, n - 1))
    if _power((mean - floor) / least_sd, MAX_SEEDS, alpha) < 0.5:
        return None
    effect = (mean - floor) / sd
    return next((k for k in range(n + 1, MAX_SEEDS + 1) if _power(effect, k, alpha) >= PLAN_POWER), MAX_SEEDS)


@dataclass(frozen=True)
class SplitGain:
    """How much one variant beats the shared model, paired seed by seed, judged by :func:`judge_gain`.

    Attributes:
        variant: the variant's name.
        per_seed: its Delta-m% against the shared model of the same seed (same data order and initialisation).
        mean: the mean of ``per_seed``.
        spread: the standard deviation of the shared model's own Delta-m% across seeds (against its mean over the
            seeds): how much a model moves from seed to seed (NaN with one seed). Shown, not judged by.
        beyond: :attr:`GainTest.beyond`: True when the paired test confirms a gain above the floor, False when
            there is none, ``None`` when one seed, or seeds that change nothing, cannot tell.
        p_value: the paired test's p-value (NaN: not tested).
        floor: the smallest gain that counts (:data:`GAIN_FLOOR`).
        seeds_vary: False when runs of different seeds were bit-identical (see :class:`IdenticalSeedsWarning`).
        seeds_needed: :attr:`GainTest.seeds_needed`, the seeds in all that would confirm a gain of this size when
            the test cannot tell yet.
    """

    variant: str
    per_seed: list[float]
    mean: float
    spread: float
    beyond: bool | None
    p_value: float = math.nan
    floor: float = GAIN_FLOOR
    seeds_vary: bool = True
    seeds_needed: int | None = None


def _mean_evaluation(evaluations: Sequence[Evaluation]) -> Evaluation:
    return {
        t: {k: statistics.fmean(e[t][k] for e in evaluations) for k in evaluations[0][t]} for t in evaluations[0]
    }


def _same_run(a: VariantRecord, b: VariantRecord) -> bool:
    """Whether two records hold bit-identical training losses and evaluations."""
    return a.losses == b.losses and a.evals == b.evals


def seeds_vary(results: Sequence[ComparisonResult]) -> bool:
    """False when two of ``results`` (one per seed) share a seed or hold bit-identical shared runs: the seed
    changed nothing (a model factory that seeds itself, with fixed batches), so the runs measure no spread.

    >>> from gradconflict.records.comparison import ComparisonResult, VariantRecord
    >>> rec = VariantRecord("shared", {"a": [1.0]}, [(1, {"a": 0.5})], {"a": "min"})
    >>> seeds_vary([ComparisonResult({"shared": rec}, ["a"], 1, 0) for _ in range(2)])
    False
    """
    seeds = [r.seed for r in results if r.seed is not None]
    if len(set(seeds)) < len(seeds):
        return False
    runs = [r["shared"] for r in results if "shared" in r.variants]
    return not any(_same_run(a, b) for i, a in enumerate(runs) for b in runs[i + 1:])


def split_gains(
    results: Sequence[ComparisonResult], *, floor: float = GAIN_FLOOR, alpha: float = GAIN_ALPHA
) -> dict[str, SplitGain]:
    """Each variant's gain over ``"shared"`` across ``results`` (one :class:`ComparisonResult` per seed, each with
    a ``"shared"`` variant): Delta-m% of its checkpoint against the same seed's shared checkpoint, judged by the
    one ceiling rule, :func:`judge_gain` (a one-sided paired t-test against ``floor``, at ``alpha``). Each result's
    ``select`` and ``average`` apply.

    Runs of different seeds that are bit-identical (or results that share a seed) are flagged: an
    :class:`IdenticalSeedsWarning`, ``seeds_vary=False`` and ``beyond=None`` unless the gain is under the floor.

    >>> from gradconflict.records.comparison import ComparisonResult, VariantRecord
    >>> def rec(name, seed, value):
    ...     return VariantRecord(name, {"a": [1.0]}, [(1, {"a": value + 0.01 * seed})], {"a": "min"})
    >>> runs = [ComparisonResult({"shared": rec("shared", s, 1.0), "branched": rec("branched", s, 0.5)}, ["a"], 1, 0)
    ...         for s in range(3)]
    >>> g = split_gains(runs)["branched"]
    >>> [round(x, 1) for x in g.per_seed], round(g.spread, 2), g.beyond, g.p_value < 0.001
    ([50.0, 49.5, 49.0], 0.99, True, True)
    """
    if not results:
        raise ValueError("split_gains needs at least one ComparisonResult (one per seed)")
    missing = [k for k, r in enumerate(results) if "shared" not in r.variants]
    if missing:
        raise ValueError(f"results {missing} have no 'shared' variant: the gains are measured against it")
    varied = seeds_vary(results)
    if len(results) > 1 and not varied:
        warnings.warn(
            "the comparison's seeds changed nothing: two results share a seed or hold bit-identical shared runs "
            "(does the model factory seed itself? are the batches fixed?), so they show no spread and prove no "
            "gain; let compare(seed=...) reach the model (no torch.manual_seed inside the factory) and the data",
            IdenticalSeedsWarning,
            stacklevel=2,
        )
    cps = [r.checkpoints for r in results]
    shared = [cp["shared"][1] for cp in cps]
    directions = results[0]["shared"].directions
    average = results[0].average
    center = _mean_evaluation(shared)
    own = [delta_m(s, center, directions, average=average) for s in shared]
    spread = statistics.stdev(own) if len(own) > 1 else math.nan
    names = [n for n in results[0].variants if n != "shared" and all(n in r.variants for r in results)]
    out = {}
    for name in names:
        per_seed = [delta_m(cp[name][1], s, directions, average=average) for cp, s in zip(cps, shared)]
        test = judge_gain(per_seed, floor=floor, alpha=alpha, seeds_vary=varied)
        out[name] = SplitGain(
            name, test.per_seed, test.mean, spread, test.beyond, test.p_value, floor, test.seeds_vary, test.seeds_needed
        )
    return out
