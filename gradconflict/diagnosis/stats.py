"""Is a pair's conflict persistent, or is it chance? Tests of the conflict rate on the measured steps.

On each measured step a pair of tasks *conflicts* (``C_ij < S``), *agrees* (``C_ij > -S``) or, for ``S < 0``, ties
(``|C_ij| <= |S|``: Recon's dead zone; with PCGrad's ``S = 0`` there are no ties). Two unrelated gradients, whose
cosine is as likely to be positive as negative, conflict as often as they agree: that is the null, a fair coin.
The *conflict rate* ``r = conflicts / (conflicts + agreements)`` is judged against it:

- **persistent**: ``r`` is significantly above 1/2 (one-sided binomial test, Benjamini-Hochberg over every pair
  and layer tested together) *and* at least a small effect, Cohen's ``h = 2 asin sqrt(r) - 2 asin sqrt(1/2) >=
  0.2`` (Cohen, 1988), i.e. ``r >= 0.6``: on long runs a 52% rate is significant but not worth a split.
- **ruled out**: ``r`` is significantly below that small effect (one-sided test of ``r >= 0.6``): the pair does not
  conflict persistently, whatever more steps would show.
- **at chance** (the conflict *oscillates*): ``r`` is significantly within ``0.4 < r < 0.6`` (two one-sided
  tests, TOST): conflicts and agreements alternate like a coin, which points to the data (label noise, small
  batches), not to the shared capacity.
- otherwise **undetermined**: not enough steps yet; :attr:`PersistenceTests.steps_needed` says about how many
  more measured steps would settle it if the rate held.

Consecutive steps are not independent (the parameters move little between them): every count is divided by the
integrated autocorrelation time ``tau = 1 + 2 sum_k rho_k`` of the step's sign series (+1 conflict, -1 agreement, 0
tie), estimated with Geyer's (1992) initial positive sequence, so that ``n / tau`` *effective* steps enter a
binomial test with non-integer counts (the regularised incomplete beta function). Sampling with ``every=k``
needs nothing special: the series holds the measured steps, whose autocorrelation is what is estimated (thinner
sampling gives less autocorrelation per measured step).

>>> signs = np.array([[1], [1], [1], [1], [1], [-1], [1], [1], [1], [1], [1], [1]])   # 11 conflicts, 1 agreement
>>> t = persistence_tests(signs, np.ones_like(signs, dtype=bool))
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

__all__ = [
    "CHANCE",
    "SMALL_EFFECT",
    "PersistenceTests",
    "autocorrelation_time",
    "binomial_tail",
    "effect_size",
    "rate_at_effect",
    "signs",
    "persistence_tests",
]

#: The conflict rate of two unrelated gradients: a fair coin.
CHANCE = 0.5
#: Cohen's (1988) "small" effect size for a proportion, ``h = 2 asin sqrt(r) - 2 asin sqrt(1/2)``.
SMALL_EFFECT = 0.2


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


def signs(cosine: np.ndarray, threshold: float) -> np.ndarray:
    """``+1`` where ``cosine < S`` (a conflict), ``-1`` where ``cosine > -S`` (an agreement), 0 in between (ties,
    only for ``S < 0``) and where the cosine is NaN (the pair was not measured). The test's ``S`` is ``min(S,
    0)``: with a positive ``S`` the chance null would not be 1/2, so conflicts are then judged by the sign.

    >>> signs(np.array([-0.5, -0.05, 0.05, 0.5, np.nan]), -0.1).tolist()
    [1, 0, 0, -1, 0]
    """
    s = min(float(threshold), 0.0)
    with np.errstate(invalid="ignore"):
        return np.where(cosine < s, 1, np.where(cosine > -s, -1, 0)).astype(np.int8)


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
    acov = np.fft.irfft(f * np.conj(f), size)[:n]
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

    def persistent(self, alpha: float) -> np.ndarray:
        """Significantly more conflicts than chance (adjusted) and at least a small effect (``r >= 0.6``)."""
        with np.errstate(invalid="ignore"):
            return (self.p_adjusted < alpha) & (self.rate >= rate_at_effect(SMALL_EFFECT))

    def agreeing(self, alpha: float) -> np.ndarray:
        """Significantly more agreements than conflicts (raw p-value: "every pair agrees" is a joint claim)."""
        return self.p_agreement < alpha

    def ruled_out(self, alpha: float) -> np.ndarray:
        """Significantly fewer conflicts than a small effect above chance: not a persistent conflict. A pair
        measured only inside the dead zone (no conflict, no agreement) is ruled out too."""
        never = (self.steps > 0) & (self.conflicts + self.agreements == 0)
        return (self.p_ruled_out < alpha) | never

    def at_chance(self, alpha: float) -> np.ndarray:
        """The rate is significantly within the small-effect band around 1/2: the conflict oscillates."""
        return self.p_chance < alpha

    def undetermined(self, alpha: float) -> np.ndarray:
        """Measured, but neither persistent nor ruled out yet."""
        return (self.steps > 0) & ~self.persistent(alpha) & ~self.ruled_out(alpha)


def persistence_tests(sign: np.ndarray, present: np.ndarray, alpha: float = 0.05) -> PersistenceTests:
    """Test ``K`` sign series at once: ``sign`` and ``present`` are ``[S, K]`` (steps in order; see :func:`signs`);
    each series is read over the steps where it is present."""
    sign = np.asarray(sign)
    present = np.asarray(present, dtype=bool)
    K = sign.shape[1]
    steps = present.sum(0)
    conflicts = ((sign > 0) & present).sum(0)
    agreements = ((sign < 0) & present).sum(0)
    tau = np.ones(K)
    for k in range(K):
        if steps[k] >= 3:
            tau[k] = autocorrelation_time(sign[present[:, k], k])
    c, m = conflicts / tau, (conflicts + agreements) / tau
    high, low = rate_at_effect(SMALL_EFFECT), rate_at_effect(-SMALL_EFFECT)
    measured = m > 0
    p_conflict = np.where(measured, binomial_tail(c, m, CHANCE, upper=True), np.nan)
    p_adjusted = np.full(K, np.nan)
    if measured.any():
        p_adjusted[measured] = stats.false_discovery_control(p_conflict[measured], method="bh")
    p_agreement = np.where(measured, binomial_tail(c, m, CHANCE, upper=False), 1.0)
    p_ruled_out = np.where(measured, binomial_tail(c, m, high, upper=False), 1.0)
    p_chance = np.where(measured, np.maximum(p_ruled_out, binomial_tail(c, m, low, upper=True)), 1.0)
    tests = PersistenceTests(
        steps, conflicts, agreements, tau, p_conflict, p_adjusted, p_agreement, p_ruled_out, p_chance, np.zeros(K)
    )
    return PersistenceTests(**{**tests.__dict__, "steps_needed": _steps_needed(tests, alpha)})


def _steps_needed(t: PersistenceTests, alpha: float) -> np.ndarray:
    """Measured steps to add for each undetermined series to be settled if its rate held (normal approximation
    of the one-sided test, effective steps converted back through ``tau`` and the share of ties)."""
    z = float(stats.norm.ppf(1 - alpha))
    r = t.rate
    high = rate_at_effect(SMALL_EFFECT)
    with np.errstate(invalid="ignore", divide="ignore"):
        towards_conflict = (z * math.sqrt(CHANCE * (1 - CHANCE)) / (r - CHANCE)) ** 2  # r >= high: significance
        towards_ruled_out = z**2 * r * (1 - r) / (high - r) ** 2  # r < high: below the small effect
        effective = np.where(r >= high, towards_conflict, towards_ruled_out)
        decided_share = (t.conflicts + t.agreements) / np.maximum(t.steps, 1)
        total = effective * t.tau / np.where(decided_share > 0, decided_share, np.nan)
    needed = np.ceil(np.maximum(total - t.steps, 1.0))
    needed = np.where(np.isfinite(needed), needed, np.inf)
    return np.where(t.undetermined(alpha), needed, 0.0)
