"""The shared base of the warning signals: the :class:`Signal` and :class:`PairFinding` types, the statuses and
the signal names, and the helpers every signal uses to name pairs and to say when its input is missing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gradconflict.diagnosis.aligned import Aligned
from gradconflict.diagnosis.conflicts import ConflictTests
from gradconflict.diagnosis.persistence import (
    CHANCE,
    effect_size,
)
from gradconflict.records.pairs import pair_key, pair_words

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


def _sorted_pair(tasks: Sequence[str], i: int, j: int) -> tuple[str, str]:
    a, b = sorted((tasks[i], tasks[j]))
    return a, b
