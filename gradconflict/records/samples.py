"""Per-example aggregates over the run: which examples keep carrying the conflict between two tasks.

One step's attribution (``report.samples``) says how each example of that batch bears on each pair of tasks; a
single step is noisy (one mini-batch, one point of the trajectory). :class:`SampleTally` adds up, per example id
and per pair of tasks, over every step measured with ``sample_ids``:

* ``count``: the steps the id was attributed in;
* ``push``: the mean of ``contribution[n, i, j] + contribution[n, j, i]``, the example's part in ``2 G_ij``
  (negative: it pushes the pair apart);
* ``apart``: the fraction of those steps in which it pushed the pair apart;
* ``agreement``: the mean of the example's own inner product ``<g_i^(n), g_j^(n)>``, divided at each step by
  the batch's mean of ``(|g_i^(m)|^2 + |g_j^(m)|^2) / 2``. It ranks the examples (:meth:`SampleTally.top`):
  lowest first.

Why the within-example inner product ranks, rather than the contribution: the contribution ``<g_i^(n), g_j>``
measures the example against the whole batch's gradient, which changes with every batch the example lands in,
so its sign is as much the batch's as the example's; the within-example product is the example's own
disagreement. Dividing by the batch's scale at each step keeps late steps (small gradients) from counting for
nothing, and averaging over an id's appearances normalises per example. On constructed data with a known answer
it finds the planted examples best (``tests/records/test_samples.py``).

Bounded memory. A run over millions of examples cannot keep a row per id and pair, so the tally keeps at most
``max_ids`` rows per pair (default 100,000; ``None``: one row per id, unbounded). Up to that many distinct ids it
is exact. Past it, it keeps exact rows for the ids that carry the conflict most and a fixed-size sketch of the
rest, and the choices are these:

* **Which rows stay.** When a pair holds more than ``max_ids`` rows, the rows are ranked by each statistic that
  :meth:`~SampleTally.top` ranks by (lowest mean ``agreement``, lowest mean ``push``, highest ``apart``); a row
  keeps its best rank of the three, and the worst-ranked are evicted until ``max_ids - max_ids // 16`` remain.
  Evicting by the ranking statistics keeps what ``top`` will be asked for; evicting a sixteenth at once makes
  the ranking (a sort of the rows) run once per ``max_ids / 16`` new ids, not at every step. Heavy hitters need
  no separate rule: an id that keeps pushing the pair apart ranks low and stays, and one that was evicted
  comes back with its history (next point). New ids are always admitted and judged at the next eviction.
* **What an evicted row leaves.** Its sums go into a count sketch (:data:`SKETCH_DEPTH` rows of
  :data:`SKETCH_WIDTH` cells, each cell the five float64 sums, every id added with a pseudo-random sign in each
  row) and its id into a Bloom filter (:data:`FILTER_BITS` bits, :data:`FILTER_HASHES` hashes). A count sketch
  rather than a count-min sketch because the sums are signed (push, agreement): its per-row estimates are
  unbiased, and the median of three takes the outliers. The hashes are fixed polynomials modulo ``2^31 - 1``
  whose coefficients come from a private generator with a fixed seed: neither torch's nor Python's global RNG
  is touched, and a saved tally resumes with the same hashes.
* **What a returning id gets.** An id the filter has never seen is new for certain (a Bloom filter has no false
  negatives): its row starts at zero and is exact. One the filter may have seen takes its sketched sums back out
  of the sketch, if its sketched count stands out of the sketch's noise (at least 1 and three times the
  standard deviation ``sqrt(F2 / width)`` of a cell's collisions, ``F2`` the sketch's own estimate of the sum of
  squared counts); otherwise the sketch is noise for that id and its row starts at zero. Either way the row is
  marked approximate.
* **What stays exact.** :meth:`~SampleTally.totals` (every attribution of the pair, summed as it comes: count,
  push, apart, agreement, and the sum of the negative pushes) and the rows of the ids that were never evicted
  (:meth:`~SampleTally.exact`). :meth:`~SampleTally.pair` and :meth:`~SampleTally.top` read the kept rows: over
  capacity (:attr:`~SampleTally.approximate`) an evicted id is missing from them and a returned id's row holds
  estimates.

Memory per pair: 65 bytes per row (five float64 sums, the id, the sorted index, the exactness flag), for at
most ``max_ids`` rows plus the ids new in one step, and once over capacity a fixed 6 MB (the sketch, 3.9 MB, and
the filter, 2 MB), whatever the number of ids. The filter's false positive rate (a new id taken for a returning
one, whose row is then marked approximate) is about 0.4% at a million evicted ids and 3% at two million.

>>> import torch
>>> from gradconflict.measure.attribution import SampleAttribution
>>> within = torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[1.0, -0.75], [-0.75, 1.0]]])
>>> step = SampleAttribution(torch.tensor([7, 9]), ("a", "b"), within, within, within.sum(0))
>>> tally = SampleTally()
>>> tally.add(step)
>>> tally.top("a", "b", k=1)
[9]
>>> tally.pair("a", "b")[9]
{'count': 1, 'push': -1.5, 'apart': 1.0, 'agreement': -0.75}
>>> tally.totals("a", "b")["negative"], tally.approximate
(-1.5, False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradconflict.measure.attribution import SampleAttribution
from gradconflict.records._pair_rows import COLUMNS, RANKINGS, PairRows

__all__ = ["SampleTally"]

#: Rows kept per pair by default.
MAX_IDS = 100_000


def _columns(push: Tensor, agreement: Tensor) -> Tensor:
    """A step's values of :data:`COLUMNS` for each example, stacked on a last axis in float64, from its ``push``
    and ``agreement`` (``[N]``, or ``[N, pairs]`` for every pair at once).

    >>> _columns(torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 0.25])).tolist()
    [[1.0, -1.0, 1.0, 0.5, -1.0], [1.0, 2.0, 0.0, 0.25, 0.0]]
    """
    push, agreement = push.double(), agreement.double()
    return torch.stack([torch.ones_like(push), push, (push < 0).double(), agreement, push.clamp(max=0)], -1)


class SampleTally:
    """Per-pair, per-id sums over the attributed steps (see the module's docstring): exact up to ``max_ids``
    distinct ids per pair (``None``: always, one row per id), bounded past it.

    Rows live in float64 tensors: 65 bytes per kept id and pair (see the module's docstring for the bound and
    what stays exact past ``max_ids``).

    >>> tally = SampleTally(max_ids=2)
    >>> tally.add_pair(("a", "b"), [1, 2, 3], torch.tensor([-1.0, 2.0, 3.0]), torch.tensor([-0.5, 0.5, 0.25]))
    >>> tally.approximate, tally.top("a", "b", k=1), tally.totals("a", "b")["count"]
    (True, [1], 3)
    """

    def __init__(self, max_ids: int | None = MAX_IDS) -> None:
        if max_ids is not None and (not isinstance(max_ids, int) or max_ids < 1):
            raise ValueError(f"max_ids must be a positive integer or None, got {max_ids!r}")
        self.max_ids = max_ids
        self._rows: dict[tuple[str, str], PairRows] = {}

    def add(self, samples: SampleAttribution) -> None:
        """Add one step's attribution (one host copy of its per-pair rows, every pair's together)."""
        pairs, push, agreement = samples.pair_columns()
        values = _columns(push.detach().cpu(), agreement.detach().cpu())  # [N, pairs, columns]
        self._add_step(samples.ids.detach().cpu().long(), dict(zip(pairs, values.unbind(1))))

    def add_pair(self, pair: tuple[str, str], ids: Sequence[int] | Tensor, push: Tensor, agreement: Tensor) -> None:
        """Add one step's per-example ``push`` and ``agreement`` ``[N]`` for ``pair`` (as a saved step holds them,
        :meth:`SampleAttribution.to_dict`)."""
        self._add_step(torch.as_tensor(ids, dtype=torch.long).reshape(-1), {pair: _columns(push, agreement)})

    def _add_step(self, ids: Tensor, pairs: Mapping[tuple[str, str], Tensor]) -> None:
        """One step's ``[N, columns]`` values of each pair (:func:`_columns`), over the same ``ids``. Pairs that keep
        the same ids in the same rows (below capacity, every pair of a run) look the ids up and admit the new ones
        once, together."""
        entries = []
        for pair, values in pairs.items():
            key = (pair[1], pair[0]) if (pair[1], pair[0]) in self._rows else (pair[0], pair[1])
            entries.append((self._rows.setdefault(key, PairRows(self.max_ids)), values))
        if not entries:
            return
        lead = entries[0][0]
        together = {id(rows) for rows, _ in entries[1:] if lead.shares_index(rows)}
        located = lead.locate(ids)
        for rows, _ in entries:  # all before any pair evicts (which renumbers its rows)
            if id(rows) in together:
                rows.follow(lead)
        for rows, values in entries:
            rows.accumulate(located if rows is lead or id(rows) in together else rows.locate(ids), values)

    @classmethod
    def from_jsonl(cls, path: str | Path, max_ids: int | None = MAX_IDS) -> SampleTally:
        """The tally of a saved run: every step of a history file (``JSONLSink``, ``History.to_jsonl``) that was
        measured with ``sample_ids``, kept to ``max_ids`` rows per pair."""
        # here, not at the top: the JSONL reader's module imports the history, which holds a tally
        from gradconflict.records.sinks.jsonl import json_lines

        tally = cls(max_ids)
        for _, data in json_lines(path):  # a line cut by a crash is skipped with a warning, as every reader does
            tally.add_saved(data.get("samples"))
        return tally

    def add_saved(self, samples: Mapping[str, Any] | None) -> None:
        """Add one saved step's attribution: the ``samples`` field of a history line (``None`` on a step measured
        without ``sample_ids``: nothing to add)."""
        if not samples:
            return
        self._add_step(torch.tensor([int(i) for i in samples["ids"]], dtype=torch.long), {
            (entry["pair"][0], entry["pair"][1]): _columns(
                torch.tensor(entry["push"], dtype=torch.float64), torch.tensor(entry["agreement"], dtype=torch.float64)
            )
            for entry in samples.get("pairs", [])
        })

    def _pair(self, a: str, b: str) -> PairRows:
        for key in ((a, b), (b, a)):
            if key in self._rows:
                return self._rows[key]
        raise KeyError(f"no attributed step holds the pair ({a!r}, {b!r}); pairs seen: {sorted(self._rows)}")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The task pairs seen, each in the order of the first report that held it."""
        return list(self._rows)

    @property
    def approximate(self) -> bool:
        """Whether some pair went over ``max_ids`` distinct ids: :meth:`pair` and :meth:`top` then read the kept
        rows only, and the rows outside :meth:`exact` hold estimates."""
        return any(rows.sketch is not None for rows in self._rows.values())

    def pair(self, a: str, b: str) -> dict[int, dict[str, Any]]:
        """id -> its aggregates for the pair (``count``, ``push``, ``apart``, ``agreement``: means over its steps),
        for every kept id (every id seen, unless :attr:`approximate`)."""
        rows = self._pair(a, b)
        sums = rows.table[: len(rows.ids), :4].tolist()
        return {
            sample_id: {"count": int(count), "push": push / count, "apart": apart / count,
                        "agreement": agreement / count}
            for sample_id, (count, push, apart, agreement) in zip(rows.ids.tolist(), sums)
        }

    def top(self, a: str, b: str, k: int = 50, by: str = "agreement") -> list[int]:
        """The ``k`` ids that carry the pair's conflict most: lowest mean ``agreement`` (or ``by="push"``, or
        highest ``by="apart"``), among the kept ids."""
        if by not in RANKINGS:
            raise ValueError(f"by must be 'agreement', 'push' or 'apart', got {by!r}")
        rows = self._pair(a, b)
        n = len(rows.ids)
        means = rows.table[:n, COLUMNS.index(by)] / rows.table[:n, 0]
        order = torch.argsort(-means if RANKINGS[by] else means)[:k]
        return rows.ids[order].tolist()

    def exact(self, a: str, b: str) -> set[int]:
        """The kept ids whose aggregates are exact (never evicted): every id of :meth:`pair` unless
        :attr:`approximate`.

        >>> tally = SampleTally(max_ids=1)
        >>> tally.add_pair(("a", "b"), [1, 2], torch.tensor([-1.0, 2.0]), torch.tensor([-0.5, 0.5]))
        >>> tally.exact("a", "b")
        {1}
        """
        rows = self._pair(a, b)
        return set(rows.ids[rows.exact].tolist())

    def totals(self, a: str, b: str) -> dict[str, float]:
        """The pair's sums over every attribution, exact whatever ``max_ids``: ``count`` (attributions),
        ``push``, ``apart`` (attributions that pushed the pair apart), ``agreement`` and ``negative`` (the sum of
        the negative pushes); and ``ids``, the distinct ids, exact unless :attr:`approximate` (then estimated).

        >>> tally = SampleTally()
        >>> tally.add_pair(("a", "b"), [1, 2, 1], torch.tensor([-1.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, 0.0]))
        >>> tally.totals("a", "b")
        {'count': 3, 'push': 1.5, 'apart': 1, 'agreement': 0.0, 'negative': -1.0, 'ids': 2}
        """
        rows = self._pair(a, b)
        count, push, apart, agreement, negative = rows.totals.tolist()
        return {"count": round(count), "push": push, "apart": round(apart), "agreement": agreement,
                "negative": negative, "ids": rows.distinct()}

    def state_dict(self) -> dict[str, Any]:
        """Per pair, the kept ids, their sums, which are exact, the exact totals and, past ``max_ids``, the sketch
        and the filter (tensors, copied)."""
        return {
            "max_ids": self.max_ids,
            "pairs": [{"pair": list(pair), **rows.state()} for pair, rows in self._rows.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``max_ids`` included)."""
        self.max_ids = state.get("max_ids", self.max_ids)
        self._rows = {
            (entry["pair"][0], entry["pair"][1]): PairRows.restore(self.max_ids, entry)
            for entry in state.get("pairs", [])
        }
