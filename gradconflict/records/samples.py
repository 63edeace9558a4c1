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
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradconflict.measure.attribution import SampleAttribution

__all__ = ["SampleTally"]

#: The columns kept per (pair, id): steps, sum of pushes, steps pushed apart, sum of agreements.
_COLUMNS = ("count", "push", "apart", "agreement")


class SampleTally:
    """Per-pair, per-id sums over the attributed steps (see the module's docstring); exact, one row per id seen.

    Rows live in float64 tensors that grow by doubling: 32 bytes per id and pair (a million ids and three pairs
    take about 100 MB).
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[dict[int, int], Tensor]] = {}

    def add(self, samples: SampleAttribution) -> None:
        """Add one step's attribution (one host copy of its per-pair rows)."""
        ids = samples.ids.tolist()
        for pair, (push, agreement) in samples.pairs().items():
            self.add_pair(pair, ids, push.detach().double().cpu(), agreement.detach().double().cpu())

    def add_pair(self, pair: tuple[str, str], ids: list[int], push: Tensor, agreement: Tensor) -> None:
        """Add one step's per-example ``push`` and ``agreement`` ``[N]`` for ``pair`` (as a saved step holds them,
        :meth:`SampleAttribution.to_dict`)."""
        values = torch.stack([torch.ones_like(push), push, (push < 0).double(), agreement], dim=1)
        key = (pair[1], pair[0]) if (pair[1], pair[0]) in self._rows else (pair[0], pair[1])
        index, table = self._rows.get(key, ({}, torch.zeros(0, len(_COLUMNS), dtype=torch.float64)))
        rows = [index.setdefault(i, len(index)) for i in ids]
        if len(index) > table.shape[0]:
            grown = torch.zeros(max(2 * table.shape[0], len(index), 64), len(_COLUMNS), dtype=torch.float64)
            grown[: table.shape[0]] = table
            table = grown
        table.index_add_(0, torch.tensor(rows, dtype=torch.long), values)
        self._rows[key] = (index, table)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> SampleTally:
        """The tally of a saved run: every step of a history file (``JSONLSink``, ``History.to_jsonl``) that was
        measured with ``sample_ids``."""
        # here, not at the top: the JSONL reader's module imports the history, which holds a tally
        from gradconflict.records.sinks.jsonl import json_lines

        tally = cls()
        for _, data in json_lines(path):  # a line cut by a crash is skipped with a warning, as every reader does
            tally.add_saved(data.get("samples"))
        return tally

    def add_saved(self, samples: Mapping[str, Any] | None) -> None:
        """Add one saved step's attribution: the ``samples`` field of a history line (``None`` on a step measured
        without ``sample_ids``: nothing to add)."""
        if not samples:
            return
        ids = [int(i) for i in samples["ids"]]
        for entry in samples.get("pairs", []):
            self.add_pair(
                (entry["pair"][0], entry["pair"][1]), ids, torch.tensor(entry["push"], dtype=torch.float64),
                torch.tensor(entry["agreement"], dtype=torch.float64),
            )

    def _pair(self, a: str, b: str) -> tuple[tuple[str, str], dict[int, int], Tensor]:
        for key in ((a, b), (b, a)):
            if key in self._rows:
                return (key, *self._rows[key])
        raise KeyError(f"no attributed step holds the pair ({a!r}, {b!r}); pairs seen: {sorted(self._rows)}")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The task pairs seen, each in the order of the first report that held it."""
        return list(self._rows)

    def pair(self, a: str, b: str) -> dict[int, dict[str, Any]]:
        """id -> its aggregates for the pair (``count``, ``push``, ``apart``, ``agreement``: means over its steps)."""
        _, index, table = self._pair(a, b)
        out = {}
        for sample_id, row in index.items():
            count, push, apart, agreement = table[row].tolist()
            out[sample_id] = {"count": int(count), "push": push / count, "apart": apart / count,
                              "agreement": agreement / count}
        return out

    def top(self, a: str, b: str, k: int = 50, by: str = "agreement") -> list[int]:
        """The ``k`` ids that carry the pair's conflict most: lowest mean ``agreement`` (or ``by="push"``)."""
        if by not in ("agreement", "push", "apart"):
            raise ValueError(f"by must be 'agreement', 'push' or 'apart', got {by!r}")
        _, index, table = self._pair(a, b)
        n = len(index)
        means = table[:n, _COLUMNS.index(by)] / table[:n, 0]
        order = torch.argsort(-means if by == "apart" else means)[:k].tolist()
        ids = list(index)
        return [ids[r] for r in order]

    def state_dict(self) -> dict[str, Any]:
        """Plain data: per pair, the ids and their sums."""
        return {
            "pairs": [
                {"pair": list(pair), "ids": list(index), "sums": table[: len(index)].tolist()}
                for pair, (index, table) in self._rows.items()
            ]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._rows = {}
        for entry in state.get("pairs", []):
            ids = [int(i) for i in entry["ids"]]
            table = torch.tensor(entry["sums"], dtype=torch.float64).reshape(len(ids), len(_COLUMNS))
            self._rows[(entry["pair"][0], entry["pair"][1])] = ({i: r for r, i in enumerate(ids)}, table)
