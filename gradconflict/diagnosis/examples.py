"""Which examples carry a pair's conflict, the share they carry, and what removing them would do: read from the
run's per-example tally (:class:`~gradconflict.records.samples.SampleTally`, fed by the steps measured with
``sample_ids``).

Three statistics, each with its own job:

* **the ranking** is the tally's, by mean within-example agreement ``<g_a^(n), g_b^(n)>`` (scaled per step, lowest
  first: :meth:`SampleTally.top <gradconflict.records.samples.SampleTally.top>`); it says which examples the tasks
  disagree on by themselves;
* **the share** is of the negative cross-task contribution: example ``n``'s summed push
  ``P_n = sum over its recorded steps of (c_ab^(n) + c_ba^(n))``, its part in ``2 G_ab`` summed over those steps;
  the pair's negative push is ``sum_n min(P_n, 0)``, and a set of ids carries ``sum_{n in set} min(P_n, 0)`` of it;
* **the what-if** recomputes the pair's Gram entry summed over the recorded steps, ``total = sum_steps G_ab =
  sum_n P_n / 2``, with the set's recorded contributions removed (``total - carried``, ``carried = sum_{n in set}
  P_n / 2``) or halved (their weight in the loss at 1/2: ``total - carried / 2``).

**Which ids** (:func:`conflicting_examples` with ``k=None``): walking down the ranking, the prefix whose share of
the negative push most exceeds its share of the ids (the point of the concentration curve farthest above the
diagonal: past it, each further id carries less than the average id's share), capped at :data:`MAX_SHARE` of the
ids and :data:`MAX_EXAMPLES` ids. No id when the ranking never carries more than its share (the conflict is then
spread over the data) or when no id pushes the pair apart.

**The caveat.** The what-if is first order and one step at a time: removing an example also removes it from the
other task's batch gradient, so the removed examples' inner products with each other (``<g_a^(n), g_b^(m)>`` for
``n, m`` both removed, in the same batch) would come back once; it keeps the trajectory as it was (the run would
have gone elsewhere without them); it covers the recorded (attributed) steps and parameters only; and it reads the
sum over those steps, not each step's sign, so it does not say how often the pair would still conflict step by step.

>>> from gradconflict.records.samples import SampleTally
>>> import torch
>>> tally = SampleTally()
>>> for _ in range(2):      # ids 0 and 1 push tasks a and b apart on every step; ids 2..19 pull them together
...     tally.add_pair(("a", "b"), list(range(20)), torch.tensor([-5.0, -4.0] + [0.375] * 18),
...                    torch.tensor([-1.0, -0.9] + [0.5] * 18))
>>> found = conflicting_examples(tally, "a", "b")
>>> found.ids, found.id_share, found.push_share
((0, 1), 0.1, 1.0)
>>> found.total, found.without, found.halved        # 2 steps * (-5 - 4 + 18 * 0.375) / 2; without ids 0 and 1
(-2.25, 6.75, 2.25)
>>> found.removing_cures, found.halving_cures
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gradconflict.records.pairs import pair_key, pair_words
from gradconflict.records.samples import SampleTally

__all__ = [
    "MAX_EXAMPLES", "MAX_SHARE", "ConflictingExamples", "Example", "carried_curve", "conflicting_examples",
    "pairs_with_examples",
]

#: Most of a pair's ids the rule names: a tenth (the set must be a small part of the data to be acted on).
MAX_SHARE = 0.1
#: Most ids the rule names, however many were attributed (a list a person can still inspect or relabel).
MAX_EXAMPLES = 1000
#: How many ids a sentence names (the rest are in :attr:`ConflictingExamples.examples`).
NAMED_IN_TEXT = 10

Ranking = Literal["agreement", "push", "apart"]


@dataclass(frozen=True)
class Example:
    """One id of a pair's conflicting examples, with its aggregates over the steps it was attributed in.

    Attributes:
        id: the example's id (its ``sample_ids`` entry).
        steps: the attributed steps it was in.
        agreement: its mean within-example agreement (the ranking's statistic).
        push: its mean part in ``2 G_ab`` per step (negative: it pushes the pair apart).
        apart: the share of its steps in which it pushed the pair apart.
        share: its share of the pair's negative push, ``min(P_n, 0) / sum_m min(P_m, 0)`` with ``P_n = steps *
            push`` (0 when its summed push is not negative, or when no id pushes the pair apart).
    """

    id: int
    steps: int
    agreement: float
    push: float
    apart: float
    share: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view."""
        return {"id": self.id, "steps": self.steps, "agreement": self.agreement, "push": self.push,
                "apart": self.apart, "share": self.share}


@dataclass(frozen=True)
class ConflictingExamples:
    """The examples that carry a pair's conflict over the recorded steps, and the what-if of removing them (see the
    module's docstring for the statistics and the caveat).

    Attributes:
        pair: the two task names, sorted.
        examples: the named ids, in ranking order, each with its aggregates (:class:`Example`).
        attributed: the ids the tally holds for the pair.
        negative: the pair's negative push, ``sum_n min(P_n, 0)`` (0 when no id pushes the pair apart).
        total: the pair's Gram entry ``G_ab`` summed over the recorded steps (on the attributed parameters),
            ``sum_n P_n / 2``.
        ranked_by: the tally's statistic that ranked the ids (``"agreement"`` unless asked otherwise).
    """

    pair: tuple[str, str]
    examples: tuple[Example, ...]
    attributed: int
    negative: float
    total: float
    ranked_by: Ranking = "agreement"

    @property
    def ids(self) -> tuple[int, ...]:
        """The named ids, in ranking order."""
        return tuple(e.id for e in self.examples)

    @property
    def id_share(self) -> float:
        """The share of the attributed ids that the named ids are."""
        return len(self.examples) / self.attributed if self.attributed else 0.0

    @property
    def push_share(self) -> float | None:
        """The share of the pair's negative push that the named ids carry (``None`` when no id pushes the pair
        apart)."""
        return math.fsum(e.share for e in self.examples) if self.negative < 0 else None

    @property
    def carried(self) -> float:
        """The named ids' part in the summed ``G_ab``, ``sum_{n in set} P_n / 2``."""
        return math.fsum(e.steps * e.push for e in self.examples) / 2

    @property
    def without(self) -> float:
        """The summed ``G_ab`` with the named ids' recorded contributions removed (first order)."""
        return self.total - self.carried

    @property
    def halved(self) -> float:
        """The summed ``G_ab`` with the named ids' recorded contributions halved (their loss weight at 1/2)."""
        return self.total - self.carried / 2

    @property
    def removing_cures(self) -> bool:
        """Whether the pair's summed inner product is negative and removing the named ids makes it non-negative."""
        return self.total < 0 <= self.without

    @property
    def halving_cures(self) -> bool:
        """Whether halving the named ids' weight makes the pair's negative summed inner product non-negative."""
        return self.total < 0 <= self.halved

    def sentence(self) -> str:
        """The finding in words (rendered from the fields): the ids, the share they carry, the what-if and its
        caveat."""
        tasks = pair_words(*self.pair)
        if self.push_share is None:
            return f"no example pushes tasks {tasks} apart over the {self.attributed} attributed ids"
        if not self.examples:
            return (
                f"no small set of examples carries the conflict between tasks {tasks}: the ids with the lowest "
                f"{self.ranked_by} carry no more than their share of the negative inner product (it is spread over "
                f"the {self.attributed} attributed ids)"
            )
        shown = ", ".join(str(i) for i in self.ids[:NAMED_IN_TEXT])
        more = f", ... ({len(self.examples) - NAMED_IN_TEXT} more)" if len(self.examples) > NAMED_IN_TEXT else ""
        head = (
            f"{self.id_share:.1%} of the examples ({len(self.examples)} of {self.attributed} ids, lowest "
            f"{self.ranked_by} first: {shown}{more}) carry {self.push_share:.0%} of the negative inner product "
            f"between {tasks}"
        )
        summed = "the inner product of the two tasks' gradients summed over the recorded steps"
        if self.total >= 0:
            what_if = f"{summed} is not negative ({self.total:+.3g}; {self.without:+.3g} without them)"
        else:
            outcome = (
                "the net conflict over the run is theirs" if self.removing_cures
                else "the net conflict is not theirs alone"
            )
            halving = "turns it to" if self.halving_cures else "leaves it at"
            what_if = (
                f"removing them turns {summed} from {self.total:+.3g} to {self.without:+.3g} ({outcome}); halving "
                f"their weight {halving} {self.halved:+.3g}"
            )
        return (
            f"{head}; {what_if} (first order, one step at a time, on the recorded steps' contributions only: it "
            "leaves out the removed examples' inner products with each other and the run they would have changed)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view, the pair as its key, with the derived shares and the what-if."""
        return {
            "pair": pair_key(*self.pair), "ranked_by": self.ranked_by, "attributed": self.attributed,
            "examples": [e.to_dict() for e in self.examples], "id_share": self.id_share,
            "push_share": self.push_share, "negative": self.negative, "total": self.total,
            "carried": self.carried, "without": self.without, "halved": self.halved,
            "removing_cures": self.removing_cures, "halving_cures": self.halving_cures,
        }


def _ranked(tally: SampleTally, a: str, b: str, by: Ranking) -> tuple[dict[int, dict[str, Any]], list[int], np.ndarray]:
    """The pair's per-id aggregates, every id in ranking order, and each ranked id's summed push ``P_n``."""
    stats = tally.pair(a, b)
    order = tally.top(a, b, k=len(stats), by=by)
    sums = np.array([stats[i]["push"] * stats[i]["count"] for i in order], dtype=np.float64)
    return stats, order, sums


def _shares(sums: np.ndarray) -> np.ndarray:
    """Each summed push's share of the negative push (0 for the non-negative ones; all 0 without a negative)."""
    negative = np.minimum(sums, 0.0)
    total = negative.sum()
    return negative / total if total < 0 else np.zeros_like(sums)


def carried_curve(tally: SampleTally, a: str, b: str, by: Ranking = "agreement") -> np.ndarray:
    """The concentration curve of the pair's conflict: entry ``k`` is the share of the negative push that the first
    ``k + 1`` ids of the ranking carry (``[n]``, non-decreasing, ending at 1; all 0 when no id pushes the pair
    apart). Against ``(k + 1) / n`` it says how much more than their share the first ids carry.

    >>> import torch
    >>> tally = SampleTally()
    >>> tally.add_pair(("a", "b"), [0, 1, 2], torch.tensor([-3.0, 1.0, -1.0]), torch.tensor([-1.0, 0.5, 0.0]))
    >>> carried_curve(tally, "a", "b").tolist()         # ranked 0, 2, 1 (agreement -1, 0, 0.5)
    [0.75, 1.0, 1.0]
    """
    _, _, sums = _ranked(tally, a, b, by)
    return np.cumsum(_shares(sums))


def _rule(curve: np.ndarray, cap: int) -> int:
    """How many ids of the ranking to name: the prefix (at most ``cap``) whose share of the negative push most
    exceeds its share of the ids; 0 when none exceeds it."""
    n = len(curve)
    gaps = curve[:cap] - np.arange(1, min(cap, n) + 1) / n
    best = int(np.argmax(gaps)) if len(gaps) else 0
    return best + 1 if len(gaps) and gaps[best] > 0 else 0


def conflicting_examples(
    tally: SampleTally, a: str, b: str, k: int | None = None, *, by: Ranking = "agreement"
) -> ConflictingExamples:
    """The examples that carry the conflict between tasks ``a`` and ``b`` over the run's recorded steps, the share
    of the negative push they carry, and the what-if of removing or halving them (the module's docstring).

    ``k=None`` names the ids by the rule (the ranking's prefix that most exceeds its share, at most
    :data:`MAX_SHARE` of the ids and :data:`MAX_EXAMPLES`); an integer names the first ``k`` of the ranking.
    ``by`` is the tally's ranking statistic. Raises ``KeyError`` when no attributed step held the pair. With a
    tally that keeps only some of the ids, the shares and sums are over the ids it holds.

    >>> import torch
    >>> tally = SampleTally()
    >>> tally.add_pair(("a", "b"), [7, 8, 9], torch.tensor([-2.0, 1.0, -2.0]), torch.tensor([-1.0, 0.5, 0.0]))
    >>> found = conflicting_examples(tally, "b", "a", k=1)
    >>> found.pair, found.ids, found.push_share, found.total, found.without
    (('a', 'b'), (7,), 0.5, -1.5, -0.5)
    """
    stats, order, sums = _ranked(tally, a, b, by)
    shares = _shares(sums)
    if k is None:
        cap = min(MAX_EXAMPLES, max(1, math.ceil(MAX_SHARE * len(order))))
        k = _rule(np.cumsum(shares), cap)
    examples = tuple(
        Example(
            id=i, steps=int(stats[i]["count"]), agreement=float(stats[i]["agreement"]), push=float(stats[i]["push"]),
            apart=float(stats[i]["apart"]), share=float(shares[r]),
        )
        for r, i in enumerate(order[: max(k, 0)])
    )
    pair = (min(a, b), max(a, b))
    return ConflictingExamples(
        pair=pair, examples=examples, attributed=len(order), negative=float(np.minimum(sums, 0.0).sum()),
        total=math.fsum(sums.tolist()) / 2, ranked_by=by,
    )


def pairs_with_examples(
    tally: SampleTally, pairs: Sequence[tuple[str, str]] | None = None
) -> list[ConflictingExamples]:
    """:func:`conflicting_examples` by the rule for each of ``pairs`` the tally holds (every pair it holds by
    default; a pair it does not hold is left out), the pair with the most negative summed inner product first.

    >>> import torch
    >>> tally = SampleTally()
    >>> tally.add_pair(("a", "b"), [0, 1], torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    >>> tally.add_pair(("a", "c"), [0, 1], torch.tensor([-3.0, 1.0]), torch.tensor([-1.0, 0.5]))
    >>> [(f.pair, f.total) for f in pairs_with_examples(tally)]
    [(('a', 'c'), -1.0), (('a', 'b'), 1.5)]
    >>> [f.pair for f in pairs_with_examples(tally, [("c", "a"), ("b", "c")])]
    [('a', 'c')]
    """
    held = {frozenset(p) for p in tally.pairs}
    wanted = list(tally.pairs) if pairs is None else [p for p in pairs if frozenset(p) in held]
    found = [conflicting_examples(tally, a, b) for a, b in dict.fromkeys(tuple(sorted(p)) for p in wanted)]
    return sorted(found, key=lambda f: f.total)
