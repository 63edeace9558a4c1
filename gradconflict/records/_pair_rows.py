"""One pair's rows of a :class:`~gradconflict.records.samples.SampleTally`: the kept ids and their sums, with a
sorted index to look them up, the pair's exact totals and, once over capacity, the count sketch and the Bloom
filter of the evicted rows (the module docstring of :mod:`gradconflict.records.samples` says what each keeps and
what stays exact)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["COLUMNS", "RANKINGS", "PairRows"]

#: The columns kept per (pair, id): steps, sum of pushes, steps pushed apart, sum of agreements, sum of the
#: negative pushes.
COLUMNS = ("count", "push", "apart", "agreement", "negative")
#: The statistics :meth:`SampleTally.top` ranks by, and whether the highest mean comes first.
RANKINGS = {"agreement": False, "push": False, "apart": True}
#: The count sketch of the evicted rows: rows (an odd number: their median is the estimate) and cells per row.
SKETCH_DEPTH = 3
SKETCH_WIDTH = 2**15
#: The Bloom filter of the evicted ids: bits (a power of two) and hashes.
FILTER_BITS = 2**24
FILTER_HASHES = 3
#: Noise of the sketch's count, in standard deviations, below which a returning id's sketched sums are not taken.
_SIGNIFICANCE = 3.0
_PRIME = 2**31 - 1
#: Coefficients of the hashes (bucket, sign, filter), from a private generator: the global RNG is not touched.
_HASHES = torch.randint(
    1, _PRIME, (2 * SKETCH_DEPTH + FILTER_HASHES, 6), generator=torch.Generator().manual_seed(0x5A3D1E),
    dtype=torch.long,
)


def _hash(ids: Tensor, coefficients: Tensor) -> Tensor:
    """``[k, N]`` values in ``[0, 2^31)``: per row of ``coefficients``, a polynomial of the id's three parts (31,
    31 and 2 bits) modulo a prime, then two rounds of xor-shift and multiplication that break its linearity (an
    arithmetic progression of ids would otherwise hash to one); no product overflows int64."""
    parts = torch.stack([ids & 0x7FFFFFFF, (ids >> 31) & 0x7FFFFFFF, (ids >> 62) & 3])
    h = ((parts[None] * coefficients[:, :3, None]) % _PRIME).sum(1).add_(coefficients[:, 3:4]) % _PRIME
    for multiplier in (coefficients[:, 4:5], coefficients[:, 5:6]):
        h = ((h ^ (h >> 15)) * multiplier) % _PRIME
    return h


class PairRows:
    """One pair's rows (ids in admission order, their sums), its exact totals and, once over capacity, the
    sketch and filter of the evicted rows."""

    def __init__(self, max_ids: int | None) -> None:
        self.max_ids = max_ids
        self.ids = torch.zeros(0, dtype=torch.long)  # row -> id
        self.table = torch.zeros(0, len(COLUMNS), dtype=torch.float64)  # grows by doubling; rows past ids: spare
        self.sorted_ids = torch.zeros(0, dtype=torch.long)  # the ids, ascending, and their rows: the lookup
        self.sorted_rows = torch.zeros(0, dtype=torch.long)
        self.exact = torch.zeros(0, dtype=torch.bool)
        self.totals = torch.zeros(len(COLUMNS), dtype=torch.float64)
        self.sketch: Tensor | None = None
        self.filter: Tensor | None = None

    def rows(self, ids: Tensor) -> Tensor:
        """Each id's row, -1 for an id not kept."""
        if not len(self.sorted_ids):
            return torch.full_like(ids, -1)
        at = torch.searchsorted(self.sorted_ids, ids).clamp_(max=len(self.sorted_ids) - 1)
        return torch.where(self.sorted_ids[at] == ids, self.sorted_rows[at], -1)

    def add(self, ids: Tensor, values: Tensor) -> None:
        self.accumulate(self.locate(ids), values)

    def locate(self, ids: Tensor) -> Tensor:
        """Each id's row, admitting the ids not kept yet."""
        rows = self.rows(ids)
        missing = rows < 0
        if bool(missing.any()):
            # the new ids, ascending, and each one's place in the order of first occurrence (its row, from n on)
            new_ids, inverse = torch.unique(ids[missing], return_inverse=True)
            first = torch.full((len(new_ids),), len(inverse), dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(len(inverse)), "amin")
            place = torch.empty_like(first)
            place[torch.argsort(first)] = torch.arange(len(new_ids))
            rows[missing] = len(self.ids) + place[inverse]
            self._admit(new_ids, place)
        return rows

    def accumulate(self, rows: Tensor, values: Tensor) -> None:
        """Add one step's ``values`` ``[N, columns]`` at their ``rows`` (:meth:`locate`); evict if over capacity."""
        self.totals += values.sum(0)
        self.table.index_add_(0, rows, values)
        if self.max_ids is not None and len(self.ids) > self.max_ids:
            self._evict(self.max_ids - self.max_ids // 16)

    def shares_index(self, other: PairRows) -> bool:
        """Whether ``other`` keeps the same ids in the same rows (neither has evicted a row, and they saw the same
        ids: the pairs of one run); ``other`` then holds this index's very tensors (none is changed in place), so
        that the next check is one identity test."""
        if self.sketch is not None or other.sketch is not None:
            return False
        if other.ids is not self.ids:
            if len(other.ids) != len(self.ids) or not torch.equal(other.ids, self.ids):
                return False
            other.follow(self)
        return True

    def follow(self, lead: PairRows) -> None:
        """Take ``lead``'s index after it admitted ids (this pair keeps the same ids, so far all exact): its rows
        for the new ids start at zero, as the rows of a table that never evicted do past its ids."""
        self._reserve(len(lead.ids))
        self.ids, self.exact = lead.ids, lead.exact
        self.sorted_ids, self.sorted_rows = lead.sorted_ids, lead.sorted_rows

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` rows in the table (doubling, up to the capacity)."""
        if rows > self.table.shape[0]:
            size = max(2 * self.table.shape[0], rows, 64)
            if self.max_ids is not None:
                size = min(size, max(rows, self.max_ids))
            grown = torch.zeros(size, len(COLUMNS), dtype=torch.float64)
            grown[: len(self.ids)] = self.table[: len(self.ids)]
            self.table = grown

    def _admit(self, new_ids: Tensor, place: Tensor) -> None:
        """Append rows for ``new_ids`` (ascending, none kept yet), each at its ``place`` after the kept ones."""
        n, u = len(self.ids), len(new_ids)
        fresh = torch.empty_like(new_ids)
        fresh[place] = new_ids
        base = torch.zeros(u, len(COLUMNS), dtype=torch.float64)
        exact = torch.ones(u, dtype=torch.bool)
        if self.filter is not None:
            exact = ~self._in_filter(fresh)
            base[~exact] = self._take(fresh[~exact])
        self._reserve(n + u)
        self.table[n : n + u] = base
        self.ids = torch.cat([self.ids, fresh])
        self.exact = torch.cat([self.exact, exact])
        # merge the new ids into the sorted lookup (linear: each new id lands after the old ones below it)
        at = torch.searchsorted(self.sorted_ids, new_ids) + torch.arange(u)
        placed = torch.zeros(n + u, dtype=torch.bool)
        placed[at] = True
        merged_ids, merged_rows = torch.empty(n + u, dtype=torch.long), torch.empty(n + u, dtype=torch.long)
        merged_ids[at], merged_rows[at] = new_ids, n + place
        merged_ids[~placed], merged_rows[~placed] = self.sorted_ids, self.sorted_rows
        self.sorted_ids, self.sorted_rows = merged_ids, merged_rows

    def _evict(self, keep: int) -> None:
        """Keep the ``keep`` rows with the best rank under any of the rankings; sketch the others."""
        n = len(self.ids)
        best = torch.full((n,), n, dtype=torch.long)
        for column, highest_first in RANKINGS.items():
            means = self.table[:n, COLUMNS.index(column)] / self.table[:n, 0]
            rank = torch.empty(n, dtype=torch.long)
            rank[torch.argsort(-means if highest_first else means)] = torch.arange(n)
            best = torch.minimum(best, rank)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[torch.argsort(best, stable=True)[:keep]] = True
        if self.sketch is None or self.filter is None:
            self.sketch = torch.zeros(SKETCH_DEPTH, SKETCH_WIDTH, len(COLUMNS), dtype=torch.float64)
            self.filter = torch.zeros(FILTER_BITS // 8, dtype=torch.uint8)
        self._sketch_add(self.ids[~kept], self.table[:n][~kept])
        bits = torch.unique(_hash(self.ids[~kept], _HASHES[2 * SKETCH_DEPTH :]) & (FILTER_BITS - 1))
        byte, bit = bits >> 3, torch.bitwise_left_shift(torch.ones_like(bits), bits & 7).to(torch.uint8)
        unset = (self.filter[byte] & bit) == 0
        self.filter.index_add_(0, byte[unset], bit[unset])  # distinct unset bits: their sum is their "or"
        rows = kept.nonzero().squeeze(1)
        self.table[: len(rows)] = self.table[rows]
        self.ids, self.exact = self.ids[rows], self.exact[rows]
        renumbered = torch.full((n,), -1, dtype=torch.long)
        renumbered[rows] = torch.arange(len(rows))
        stays = kept[self.sorted_rows]
        self.sorted_ids, self.sorted_rows = self.sorted_ids[stays], renumbered[self.sorted_rows[stays]]

    def _in_filter(self, ids: Tensor) -> Tensor:
        assert self.filter is not None
        bits = _hash(ids, _HASHES[2 * SKETCH_DEPTH :]) & (FILTER_BITS - 1)
        return ((self.filter[bits >> 3].long() >> (bits & 7)) & 1).bool().all(0)

    def _cells(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Each id's cell in each row of the flattened sketch ``[depth, N]``, and its sign there."""
        h = _hash(ids, _HASHES[: 2 * SKETCH_DEPTH])
        cells = (h[:SKETCH_DEPTH] & (SKETCH_WIDTH - 1)) + SKETCH_WIDTH * torch.arange(SKETCH_DEPTH)[:, None]
        return cells, (1 - 2 * (h[SKETCH_DEPTH:] & 1)).double()

    def _sketch_add(self, ids: Tensor, sums: Tensor) -> None:
        assert self.sketch is not None
        cells, sign = self._cells(ids)
        signed = sign[:, :, None] * sums[None]
        self.sketch.view(-1, len(COLUMNS)).index_add_(0, cells.reshape(-1), signed.reshape(-1, len(COLUMNS)))

    def _take(self, ids: Tensor) -> Tensor:
        """The sketched sums of returning ids, moved out of the sketch; zero where the count is within noise."""
        assert self.sketch is not None
        cells, sign = self._cells(ids)
        estimate = (self.sketch.view(-1, len(COLUMNS))[cells] * sign[:, :, None]).median(0).values
        noise = math.sqrt(float(self.sketch[:, :, 0].square().sum(1).median()) / SKETCH_WIDTH)
        count = estimate[:, 0].round()
        taken = count >= max(1.0, _SIGNIFICANCE * noise)
        base = torch.zeros_like(estimate)
        base[taken] = torch.stack([
            count, estimate[:, 1], torch.minimum(estimate[:, 2].clamp(min=0), count), estimate[:, 3],
            estimate[:, 4].clamp(max=0),
        ], dim=1)[taken]
        self._sketch_add(ids, -base)
        return base

    def distinct(self) -> int:
        """The distinct ids seen: exact while nothing was evicted; else the exact rows plus the filter's estimate
        of the evicted ids, ``-(m / k) ln(1 - set bits / m)``."""
        if self.filter is None:
            return len(self.ids)
        set_bits = sum(int(((self.filter >> s) & 1).sum()) for s in range(8))
        evicted = -FILTER_BITS / FILTER_HASHES * math.log1p(-set_bits / FILTER_BITS)
        return int(self.exact.sum()) + round(evicted)

    def state(self) -> dict[str, Any]:
        n = len(self.ids)
        tensors = {"ids": self.ids, "sums": self.table[:n], "exact": self.exact, "totals": self.totals,
                   "sketch": self.sketch, "filter": self.filter}
        return {k: None if t is None else t.clone() for k, t in tensors.items()}

    @classmethod
    def restore(cls, max_ids: int | None, state: dict[str, Any]) -> PairRows:
        rows = cls(max_ids)
        rows.ids = torch.as_tensor(state["ids"], dtype=torch.long).clone()
        rows.table = torch.as_tensor(state["sums"], dtype=torch.float64).reshape(len(rows.ids), len(COLUMNS)).clone()
        rows.exact = torch.as_tensor(state["exact"], dtype=torch.bool).clone()
        rows.totals = torch.as_tensor(state["totals"], dtype=torch.float64).clone()
        rows.sorted_ids, order = torch.sort(rows.ids)
        rows.sorted_rows = order
        for name in ("sketch", "filter"):
            if state.get(name) is not None:
                setattr(rows, name, state[name].clone())
        return rows
