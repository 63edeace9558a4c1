"""Is a pair's conflict persistent, or is it chance? Tests of the conflict rate on the measured steps.

On each measured step a pair of tasks *conflicts* (``C_ij < S``), *agrees* (``C_ij > -S``) or, for ``S < 0``, ties
(``|C_ij| <= |S|``: Recon's dead zone; with PCGrad's ``S = 0`` there are no ties). Two unrelated gradients, whose
cosine is as likely to be positive as negative, conflict as often as they agree: that is the null, a fair coin.
The *conflict rate* ``r = conflicts / (conflicts + agreements)`` is judged against it:

- **persistent**: ``r`` is significantly above 1/2 (one-sided binomial test, Benjamini-Hochberg over every pair
  and layer tested together), by at least a small effect both in how often and in how much the gradients
  conflict (Cohen, 1988): ``h = 2 asin sqrt(r) - 2 asin sqrt(1/2) >= 0.2``, i.e. ``r >= 0.6``, and a mean cosine
  (a correlation of the two gradients) of at most ``-0.1``. On long runs a 52% rate is significant but not worth
  a split, and two gradients that are nearly orthogonal (a mean cosine of -0.03) barely slow each other down,
  however often the sign comes out negative.
- **ruled out**: ``r`` is significantly below that small effect (one-sided test of ``r >= 0.6``), or the mean
  cosine significantly above ``-0.1`` (one-sided t-test): the pair does not conflict persistently, whatever more
  steps would show.
- **at chance** (the conflict *oscillates*): ``r`` is significantly within ``0.4 < r < 0.6`` (two one-sided
  tests, TOST): conflicts and agreements alternate like a coin, which points to the data (label noise, small
  batches), not to the shared capacity.
- otherwise **undetermined**: not enough steps yet; :attr:`PersistenceTests.steps_needed` says about how many
  more measured steps would settle it if the rate held.

No series is settled (persistent, ruled out or at chance) on fewer than :func:`minimum_effective_steps` effective
steps: the fewest on which the exact binomial test can reject chance at all (5 at ``alpha = 0.05``, since
``0.5 ** 5 < 0.05 <= 0.5 ** 4``). Below it, a constant cosine would otherwise settle the magnitude t-test on two
identical steps.

Consecutive steps are not independent (the parameters move little between them): every count is divided by the
integrated autocorrelation time ``tau = 1 + 2 sum_k rho_k`` of the step's sign series (+1 conflict, -1 agreement, 0
tie), estimated with Geyer's (1992) initial positive sequence, so that ``n / tau`` *effective* steps enter a
binomial test with non-integer counts (the regularised incomplete beta function). Sampling with ``every=k``
needs nothing special: the series holds the measured steps, whose autocorrelation is what is estimated (thinner
sampling gives less autocorrelation per measured step).

>>> cosine = np.array([[-0.5]] * 5 + [[0.5]] + [[-0.5]] * 6)   # 11 conflicts, 1 agreement
>>> t = persistence_tests(cosine)
>>> int(t.conflicts[0]), int(t.agreements[0]), round(float(t.p_conflict[0]), 4)   # P(X >= 11 | 12, 1/2)
(11, 1, 0.0032)
>>> bool(t.persistent(0.05)[0])
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from gradconflict.diagnosis.thresholds import ALPHA
from gradconflict.measure.metrics import CONFLICT_COSINE

__all__ = [
    "CHANCE",
    "AT_CHANCE_RATE",
    "PERSISTENT_RATE",
    "SMALL_CORRELATION",
    "SMALL_EFFECT",
    "PersistenceTests",
    "SeriesStatistics",
    "autocorrelation_time",
    "binomial_tail",
    "effect_size",
    "minimum_effective_steps",
    "rate_at_effect",
    "signs",
    "persistence_tests",
    "series_statistics",
    "family_tests",
]

#: The conflict rate of two unrelated gradients: a fair coin.
CHANCE = 0.5
#: Cohen's (1988) "small" effect size for a proportion, ``h = 2 asin sqrt(r) - 2 asin sqrt(1/2)``.
SMALL_EFFECT = 0.2
#: Cohen's (1988) "small" correlation: a cosine (the correlation of two gradients) of magnitude 0.1.
SMALL_CORRELATION = 0.1


def effect_size(rate: np.ndarray | float) -> np.ndarray:
    """Cohen's ``h`` of a conflict rate against chance: ``2 asin sqrt(r) - 2 asin sqrt(1/2)``.

    >>> round(float(effect_size(0.6)), 3)
    0.201
    """
    return 2 * np.arcsin(np.sqrt(np.asarray(rate, dtype=np.float64))) - 2 * math.asin(math.sqrt(CHANCE))


def rate_at_effect(h: float) -> float:
    """The conflict rate whose effect size against chance is ``h`` (the inverse of :func:`effect_size`).

    >>> round(rate_at_effect(SMALL_EFFECT), 4), round(rate_at_effect(-SMALL_EFFECT), 4)
    (0.5993, 0.4007)
    """
    return math.sin((h + 2 * math.asin(math.sqrt(CHANCE))) / 2) ** 2


#: The smallest conflict rate that can count as persistent: Cohen's small effect above chance (about 0.6).
PERSISTENT_RATE = rate_at_effect(SMALL_EFFECT)
#: The largest conflict rate still "at chance": Cohen's small effect below chance (about 0.4).
AT_CHANCE_RATE = rate_at_effect(-SMALL_EFFECT)


def minimum_effective_steps(alpha: float = ALPHA) -> int:
    """The fewest effective steps on which the exact one-sided binomial test of the conflict rate can reject chance
    at level ``alpha`` (a pair conflicting on every step): ``n`` with ``CHANCE ** n < alpha``. No series is settled
    on fewer.

    >>> minimum_effective_steps(0.05), minimum_effective_steps(0.01)
    (5, 7)
    """
    return math.floor(math.log(alpha) / math.log(CHANCE)) + 1


def __getattr__(name: str) -> object:
    # Before the re-layout this module held the whole family's tests, now in gradconflict.diagnosis.conflicts.
    if name in ("ConflictTests", "conflict_tests"):
        import warnings

        from gradconflict.diagnosis import conflicts

        warnings.warn(
            f"gradconflict.diagnosis.persistence.{name} moved to gradconflict.diagnosis.conflicts.{name}; import it "
            "from there (the old path goes in a later release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(conflicts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def signs(cosine: np.ndarray, threshold: float) -> np.ndarray:
    """``+1`` where ``cosine < S`` (a conflict), ``-1`` where ``cosine > -S`` (an agreement), 0 in between (ties,
    only for ``S < 0``) and where the cosine is NaN (the pair was not measured). The test's ``S`` is ``min(S,
    0)``: with a positive ``S`` the chance null would not be 1/2, so conflicts are then judged by the sign.

    >>> signs(np.array([-0.5, -0.05, 0.05, 0.5, np.nan]), -0.1).tolist()
    [1, 0, 0, -1, 0]
    """
    s = min(float(threshold), 0.0)
    out = np.zeros(np.shape(cosine), dtype=np.int8)  # int8 from the start: a long run has millions of signs
    with np.errstate(invalid="ignore"):
        out[cosine > -s] = -1
        out[cosine < s] = 1
    return out


def autocorrelation_time(series: np.ndarray) -> float:
    """Integrated autocorrelation time ``tau = 1 + 2 sum_{k>=1} rho_k`` of one series (at least 1), with Geyer's
    (1992) initial positive sequence: the sums ``rho_{2m} + rho_{2m+1}`` are added while they are positive.

    A constant series (or one of fewer than 3 values) gives 1: it carries no evidence of dependence.

    >>> autocorrelation_time(np.array([1.0, -1.0] * 50))          # alternating: no positive dependence
    1.0
    >>> round(autocorrelation_time(np.repeat([1.0, -1.0], 10).repeat(5)), 1) > 5
    True
    """
    x = np.asarray(series, dtype=np.float64)
    n = len(x)
    x = x - x.mean()
    if n < 3 or not np.any(x):
        return 1.0
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(x, size)
    power = f.real**2  # |f|^2, as f * conj(f) gives it, without complex temporaries (a long run: millions)
    power += f.imag**2
    del f
    acov = np.fft.irfft(power, size)[:n]
    rho = acov / acov[0]
    pairs = rho[: n - n % 2].reshape(-1, 2).sum(1)  # Gamma_m = rho_2m + rho_2m+1
    positive = np.flatnonzero(pairs <= 0)
    m = positive[0] if len(positive) else len(pairs)
    tau = -1.0 + 2.0 * float(pairs[:m].sum())
    return max(tau, 1.0)


def binomial_tail(k: np.ndarray, n: np.ndarray, p: float, upper: bool) -> np.ndarray:
    """``P(X >= k)`` (``upper``) or ``P(X <= k)`` for ``X ~ Binomial(n, p)``, continuous in ``k`` and ``n`` (the
    regularised incomplete beta function), so that effective (non-integer) counts can be tested. Equal to
    ``scipy.stats.binom`` for integers.

    >>> float(binomial_tail(np.array(9.0), np.array(10.0), 0.5, upper=True))   # P(X >= 9) = 11 / 1024
    0.0107421875
    """
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if upper:
            inside = special.betainc(np.maximum(k, 1e-300), np.maximum(n - k + 1, 1e-300), p)
            return np.where(k <= 0, 1.0, np.where(k > n, 0.0, inside))
        inside = special.betainc(np.maximum(n - k, 1e-300), np.maximum(k + 1, 1e-300), 1 - p)
        return np.where(k >= n, 1.0, np.where(k < 0, 0.0, inside))


@dataclass(frozen=True)
class PersistenceTests:
    """The tests of ``K`` series (pairs, or pairs on layers), each array ``[K]``. See the module docstring.

    Attributes:
        steps: measured steps on which the pair was measured.
        conflicts: of them, steps with ``C_ij < S``.
        agreements: of them, steps with ``C_ij > -S``.
        tau: the integrated autocorrelation time of the sign series (each step counts ``1 / tau``).
        p_conflict: one-sided p-value of "conflicts more often than chance" (raw; see :meth:`persistent`).
        p_adjusted: ``p_conflict`` adjusted for testing every series of the family together (Benjamini-Hochberg);
            slicing with :meth:`take` keeps the family's adjustment.
        p_agreement: one-sided p-value of "agrees more often than chance".
        p_ruled_out: one-sided p-value of "conflicts less often than a small effect above chance".
        p_chance: p-value of "the rate is within the small-effect band around 1/2" (TOST).
        mean_cosine: the mean cosine over the steps the pair was measured on (NaN: never).
        p_weak: one-sided p-value of "the mean cosine is above -0.1" (a conflict weaker than small).
        steps_needed: measured steps (carrying the pair) to add, about, for an undetermined pair to be settled at
            its current rate (0 when settled; ``inf`` when no number would do).
    """

    steps: np.ndarray
    conflicts: np.ndarray
    agreements: np.ndarray
    tau: np.ndarray
    p_conflict: np.ndarray
    p_adjusted: np.ndarray
    p_agreement: np.ndarray
    p_ruled_out: np.ndarray
    p_chance: np.ndarray
    mean_cosine: np.ndarray
    p_weak: np.ndarray
    steps_needed: np.ndarray

    @property
    def rate(self) -> np.ndarray:
        """``conflicts / (conflicts + agreements)``: NaN when the pair was never measured outside the dead zone."""
        decided = self.conflicts + self.agreements
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(decided > 0, self.conflicts / np.maximum(decided, 1), np.nan)

    @property
    def persistence(self) -> np.ndarray:
        """``conflicts / steps``: the share of the measured steps on which the pair conflicts (NaN: none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.steps > 0, self.conflicts / np.maximum(self.steps, 1), np.nan)

    def take(self, index: np.ndarray | slice | list[int]) -> PersistenceTests:
        """The tests of some of the series (their family's adjustment kept)."""
        return PersistenceTests(**{k: v[index] for k, v in self.__dict__.items()})

    @property
    def effective_steps(self) -> np.ndarray:
        """``steps / tau``: the independent steps each test counts."""
        return self.steps / self.tau

    def enough(self, alpha: float) -> np.ndarray:
        """At least :func:`minimum_effective_steps` effective steps: the series may be settled."""
        return self.effective_steps >= minimum_effective_steps(alpha)

    def persistent(self, alpha: float) -> np.ndarray:
        """Significantly more conflicts than chance (adjusted), by at least a small effect in frequency
        (``r >= 0.6``) and in magnitude (mean cosine ``<= -0.1``), on enough effective steps."""
        with np.errstate(invalid="ignore"):
            strong = self.mean_cosine <= -SMALL_CORRELATION
            return (self.p_adjusted < alpha) & (self.rate >= PERSISTENT_RATE) & strong & self.enough(alpha)

    def agreeing(self, alpha: float) -> np.ndarray:
        """Significantly more agreements than conflicts (raw p-value: "every pair agrees" is a joint claim)."""
        return self.p_agreement < alpha

    def ruled_out(self, alpha: float) -> np.ndarray:
        """Significantly fewer conflicts than a small effect above chance, or a mean cosine significantly above
        -0.1: not a persistent conflict. A pair measured only inside the dead zone (no conflict, no agreement) is
        ruled out too."""
        never = (self.steps > 0) & (self.conflicts + self.agreements == 0)
        return ((self.p_ruled_out < alpha) | (self.p_weak < alpha) | never) & self.enough(alpha)

    def at_chance(self, alpha: float) -> np.ndarray:
        """The rate is significantly within the small-effect band around 1/2: the conflict oscillates."""
        return (self.p_chance < alpha) & self.enough(alpha)

    def undetermined(self, alpha: float) -> np.ndarray:
        """Measured, but neither persistent nor ruled out yet."""
        return (self.steps > 0) & ~self.persistent(alpha) & ~self.ruled_out(alpha)


@dataclass(frozen=True)
class SeriesStatistics:
    """What the tests read of ``K`` series, each array ``[K]`` (:func:`series_statistics`): enough to test them
    as one family without holding the series.

    Attributes:
        steps: steps on which the series was measured (not NaN).
        conflicts: of them, steps with ``C_ij < S``.
        agreements: of them, steps with ``C_ij > -S``.
        tau: the integrated autocorrelation time of the sign series.
        tau_cosine: that of the cosine series.
        mean: the mean cosine over the measured steps (NaN: none).
        sd: its standard deviation, ``ddof=1`` (NaN: fewer than two steps).

    >>> s = series_statistics(np.array([[-0.5, np.nan], [0.5, 0.2], [-0.5, 0.4]]))
    >>> s.steps.tolist(), s.conflicts.tolist(), s.mean.round(2).tolist()
    ([3, 2], [2, 0], [-0.17, 0.3])
    """

    steps: np.ndarray
    conflicts: np.ndarray
    agreements: np.ndarray
    tau: np.ndarray
    tau_cosine: np.ndarray
    mean: np.ndarray
    sd: np.ndarray

    @staticmethod
    def concatenate(parts: list[SeriesStatistics]) -> SeriesStatistics:
        """The statistics of the series of ``parts``, in order (one family)."""
        return SeriesStatistics(**{k: np.concatenate([p.__dict__[k] for p in parts]) for k in parts[0].__dict__})


def series_statistics(cosine: np.ndarray, threshold: float = CONFLICT_COSINE) -> SeriesStatistics:
    """:class:`SeriesStatistics` of ``cosine`` ``[S, K]`` (NaN where a series was not measured), with
    :func:`signs` at ``threshold``. A series at a time: on a long run the temporaries are one series long, not the
    whole ``[S, K]``."""
    K = cosine.shape[1]
    steps, conflicts, agreements = (np.zeros(K, dtype=np.int64) for _ in range(3))
    tau, tau_cosine = np.ones(K), np.ones(K)
    mean, sd = np.full(K, np.nan), np.full(K, np.nan)
    for k in range(K):
        values = np.asarray(cosine[:, k], dtype=np.float64)
        values = values[~np.isnan(values)]
        sign = signs(values, threshold)
        n = steps[k] = len(values)
        conflicts[k], agreements[k] = (sign > 0).sum(), (sign < 0).sum()
        if n >= 3:
            tau[k], tau_cosine[k] = autocorrelation_time(sign), autocorrelation_time(values)
        if n > 0:
            mean[k] = values.sum() / n
        if n > 1:
            sd[k] = np.sqrt(((values - mean[k]) ** 2).sum() / (n - 1))
    return SeriesStatistics(steps, conflicts, agreements, tau, tau_cosine, mean, sd)


def persistence_tests(
    cosine: np.ndarray, threshold: float = CONFLICT_COSINE, alpha: float = ALPHA
) -> PersistenceTests:
    """Test ``K`` series at once: ``cosine`` is ``[S, K]``, the pair's cosine on each measured step in step order
    (NaN where the pair was not measured); each series is read over the steps where it was measured, with
    :func:`signs` at ``threshold`` (``S``)."""
    return family_tests(series_statistics(cosine, threshold), alpha)


def family_tests(statistics: SeriesStatistics, alpha: float = ALPHA) -> PersistenceTests:
    """The tests of a family of series from their :class:`SeriesStatistics` (:func:`persistence_tests` without
    the series: a long run's family can be summed up a few series at a time)."""
    steps, tau = statistics.steps, statistics.tau
    conflicts, agreements = statistics.conflicts, statistics.agreements
    K = len(steps)
    c, m = conflicts / tau, (conflicts + agreements) / tau
    high, low = PERSISTENT_RATE, AT_CHANCE_RATE
    measured = m > 0
    p_conflict = np.where(measured, binomial_tail(c, m, CHANCE, upper=True), np.nan)
    p_adjusted = np.full(K, np.nan)
    if measured.any():
        p_adjusted[measured] = stats.false_discovery_control(p_conflict[measured], method="bh")
    p_agreement = np.where(measured, binomial_tail(c, m, CHANCE, upper=False), 1.0)
    p_ruled_out = np.where(measured, binomial_tail(c, m, high, upper=False), 1.0)
    p_chance = np.where(measured, np.maximum(p_ruled_out, binomial_tail(c, m, low, upper=True)), 1.0)
    p_weak = _weaker_than_small(statistics)
    tests = PersistenceTests(
        steps, conflicts, agreements, tau, p_conflict, p_adjusted, p_agreement, p_ruled_out, p_chance,
        statistics.mean, p_weak, np.zeros(K),
    )
    return PersistenceTests(**{**tests.__dict__, "steps_needed": _steps_needed(tests, statistics, alpha)})


def _weaker_than_small(statistics: SeriesStatistics) -> np.ndarray:
    """Each series' one-sided p-value of "the mean cosine is above -0.1" (a t-test on ``steps / tau_cosine``
    effective steps; a constant series is decided by its value)."""
    steps, mean, sd = statistics.steps, statistics.mean, statistics.sd
    n = steps / statistics.tau_cosine
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (mean + SMALL_CORRELATION) / (sd / np.sqrt(n))
        p = stats.t.sf(t, np.maximum(n - 1, 1))
    constant = (steps > 1) & (sd == 0)
    p = np.where(constant, np.where(mean > -SMALL_CORRELATION, 0.0, 1.0), p)
    return np.where(steps > 1, p, 1.0)


#: The effective numbers of steps :func:`_steps_needed` tries, from 1 to ten million.
_EFFECTIVE_GRID = np.geomspace(1.0, 1e7, 481)


def _first_passing(p: np.ndarray, alpha: float) -> np.ndarray:
    """``[K, G]`` p-values over :data:`_EFFECTIVE_GRID` -> the first effective size with ``p < alpha`` (inf)."""
    passing = p < alpha
    return np.where(passing.any(1), _EFFECTIVE_GRID[np.argmax(passing, axis=1)], np.inf)


def _steps_needed(t: PersistenceTests, statistics: SeriesStatistics, alpha: float) -> np.ndarray:
    """Measured steps to add for each undetermined series to be settled if its statistics held: the fewest over
    the ways it could settle (persistent; ruled out by its rate; ruled out by its mean cosine). For the rate, the
    smallest effective size at which the same rate passes the (continuous) binomial test, at the level the family's
    adjustment currently asks of this series (``alpha`` times its raw over adjusted p-value); for the mean cosine,
    the smallest at which the same mean and spread pass the t-test that is run (Student's t on ``n - 1`` degrees of
    freedom, not its normal approximation, which asks for too few on short runs). Effective steps are converted
    back through ``tau`` (and the share of ties for the rate), and never fall short of
    :func:`minimum_effective_steps`."""
    r = np.nan_to_num(t.rate, nan=0.0)[:, None]
    high = PERSISTENT_RATE
    n = _EFFECTIVE_GRID[None, :]
    sd, tau_cosine = statistics.sd, statistics.tau_cosine
    margin = t.mean_cosine + SMALL_CORRELATION
    with np.errstate(invalid="ignore", divide="ignore"):
        decided_share = (t.conflicts + t.agreements) / np.maximum(t.steps, 1)
        per_step = t.tau / np.where(decided_share > 0, decided_share, np.nan)
        can_persist = (t.rate >= high) & (margin <= 0)
        level = alpha * np.where(t.p_adjusted > 0, np.nan_to_num(t.p_conflict / t.p_adjusted, nan=1.0), 1.0)
        tails = binomial_tail(r * n, n, CHANCE, True)
        persistent = np.where(can_persist, _first_passing(tails / level[:, None] * alpha, alpha), np.inf)
        by_rate = np.where(t.rate < high, _first_passing(binomial_tail(r * n, n, high, False), alpha), np.inf)
        t_stat = margin[:, None] * np.sqrt(n) / np.where(sd > 0, sd, np.nan)[:, None]
        p_magnitude = np.where((sd > 0)[:, None], stats.t.sf(t_stat, np.maximum(n - 1, 1)), 0.0)
        by_magnitude = np.where(margin > 0, _first_passing(p_magnitude, alpha) * tau_cosine, np.inf)
        total = np.fmin(np.fmin(persistent, by_rate) * per_step, by_magnitude)
        total = np.maximum(total, minimum_effective_steps(alpha) * t.tau)
    needed = np.ceil(np.maximum(np.nan_to_num(total, nan=np.inf) - t.steps, 1.0))
    return np.where(t.undetermined(alpha), needed, 0.0)
