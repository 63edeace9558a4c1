"""The order of a run's layers, bottom to top, as its records keep it.

A report lists its layers bottom to top, in the model's order (``model.named_modules()``; the monitor measures
them so), and a saved run keeps that order: a history record keeps its layers in the order of the report's
``layers`` dict, and each JSONL line in the order of its ``"layers"`` object. Steps may carry different layers
(a shared set that changes mid-run: an adapter put in, a block frozen); :func:`merge_orders` merges their orders
into the run's one order, which every reader of the run (the diagnosis, the run summary, the figures, the command
line) takes when no model is given.

Lines written before the layers were kept in the model's order (history line schema 1) listed them as the
backward reached them, top first; they are read in :func:`natural_key` order of the names, as readers did then.

>>> merge_orders([["stem", "body", "neck"], ["stem", "body", "body.lora", "neck"]])
['stem', 'body', 'body.lora', 'neck']
>>> sorted(["block.10", "block.2", "embed"], key=natural_key)
['block.2', 'block.10', 'embed']
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["merge_orders", "natural_key"]


def merge_orders(orders: Iterable[Sequence[str]]) -> list[str]:
    """One order of the layer names of several steps, each listing its layers bottom to top: every name once, and
    each step's names in that step's order (a topological order of what the steps say); of the names free to
    come next, the one met first comes first.

    Steps that disagree (which no monitored run gives) are settled by first appearance.

    >>> merge_orders([["a", "c"], ["b", "c", "d"], ["a", "x"]])
    ['a', 'b', 'c', 'd', 'x']
    """
    first: dict[str, int] = {}  # each name's rank of first appearance
    above: dict[str, set[str]] = {}  # the names a step puts right above each
    below = Counter[str]()  # how many names not yet placed a step puts right below each
    for order in dict.fromkeys(tuple(o) for o in orders):
        for name in order:
            first.setdefault(name, len(first))
            above.setdefault(name, set())
        for low, high in zip(order, order[1:]):
            if high not in above[low]:
                above[low].add(high)
                below[high] += 1
    free = [(rank, name) for name, rank in first.items() if not below[name]]
    heapq.heapify(free)
    merged: list[str] = []
    left = dict(first)  # the names not yet placed, in order of first appearance
    while left:
        if free:
            name = heapq.heappop(free)[1]
        else:  # the steps disagree: the name met first goes first
            name = next(iter(left))
            below[name] = 0
        del left[name]
        merged.append(name)
        for high in above[name]:
            below[high] -= 1
            if below[high] == 0 and high in left:
                heapq.heappush(free, (first[high], high))
    return merged


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key of a layer name in natural order: digits compare as numbers, so ``"block.10"`` follows
    ``"block.2"``. Only for layer names whose order nothing recorded (history lines of schema 1)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]
