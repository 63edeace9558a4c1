"""The signal :func:`magnitude_dominance` (signal 7), which a magnitude-aware re-weighting cures, with
:data:`MAGNITUDE_WEIGHTINGS` and :func:`update_shares`."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import stats
from torch import Tensor

from gradconflict.diagnosis.aligned import Aligned, Run, align, no_pair_reason
from gradconflict.diagnosis.persistence import (
    CHANCE,
    autocorrelation_time,
    binomial_tail,
    minimum_effective_steps,
)
from gradconflict.diagnosis.signals.base import (
    Signal,
    _finite_or_none,
    _not_available,
    _pair_names,
    _sorted_pair,
)
from gradconflict.diagnosis.thresholds import Thresholds

#: The weightings the advice offers first against dominating magnitudes: IMTL-G (Liu et al., 2021) and
#: Aligned-MTL (Senushkin et al., 2023) both equalise the tasks' contributions to the update, whatever their scale
#: (names of :data:`gradconflict.weighting.METHODS`; both need ``pip install 'gradconflict[weighting]'``).
MAGNITUDE_WEIGHTINGS = ("imtl-g", "aligned-mtl")


def update_shares(aligned: Aligned) -> np.ndarray:
    """``[S, T]`` the share of each step's update ``u = sum_j w_j g_j`` along each task's weighted gradient,
    ``w_i <g_i, u> / |u|^2`` (the shares of a step sum to 1), from the Gram; NaN where the task is absent or the
    step carried fewer than two tasks."""

    def shares(G: Tensor, w: Tensor, rows: slice) -> np.ndarray:
        Gw = np.einsum("sij,sj->si", G.numpy(), w.numpy())
        with np.errstate(invalid="ignore", divide="ignore"):
            share = w.numpy() * Gw / np.einsum("si,si->s", w.numpy(), Gw)[:, None]
        return np.where(aligned.present[rows] & aligned.multi[rows, None], share, np.nan)

    return aligned.by_rows(shares)


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
