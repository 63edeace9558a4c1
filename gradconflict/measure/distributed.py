"""Many processes: how each rank's measurement becomes the run's.

Under data parallelism (DDP, FSDP) with R ranks, task i's gradient is the mean of the ranks' gradients,
``g_i = (1/R) sum_r g_i^r``, so the global Gram ``G_ij = (1/R^2) sum_r sum_s <g_i^r, g_j^s>`` has cross-rank
terms: averaging the per-rank Grams gives a different, noisier quantity. Three ways to get it, chosen with
``ConflictMonitor(..., sync=...)``:

- ``"exact"``: each layer's T per-task gradients are all-reduced as the measuring pass reaches the layer (one
  layer at a time, so memory stays bounded), then their Gram is taken. Exact; communication per measured step:
  T x the shared parameters (T times what DDP sends for the training gradient).
- ``"sketch"``: each layer's T per-task gradients are projected to k numbers by a CountSketch (each coordinate
  added, with a random sign, into one of k buckets), seeded identically on every rank and fresh at every step.
  The sketch is linear, so it adds up over ranks and layers: one all-reduce of ``[layers, T, k]`` numbers per
  measured step, and ``G ~ S S^T``. Unbiased; each entry's standard deviation is at most
  ``sqrt(2 / k) n_i n_j`` (so cosines are within about ``sqrt(2 / k)``).
- ``"local"``: no communication; each rank reports the Gram of its own batch, labelled ``sync="local"``.

A :class:`Sync` also makes every rank take the same decision on a non-finite step, and gives every rank the same
losses in its report (their mean over the ranks).

>>> Sync.resolve(None, "exact", None, 4096) is None   # not distributed: nothing to synchronise
True
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradconflict.measure.attribution import SampleAttribution
from gradconflict.measure.rules.base import gram_of

__all__ = ["SYNC_MODES", "Reduction", "Sync", "sketch_std"]

SyncMode = Literal["exact", "sketch", "local"]

#: The values ``ConflictMonitor(sync=...)`` accepts.
SYNC_MODES: tuple[str, ...] = ("exact", "sketch", "local")


def sketch_std(k: int) -> float:
    """Bound on the standard deviation of a sketched Gram entry, in units of ``n_i n_j``: ``sqrt(2 / k)``.

    >>> round(sketch_std(4096), 4)
    0.0221
    """
    return math.sqrt(2.0 / k)


@dataclass
class Sync:
    """The process group the monitor synchronises over, and how.

    Attributes:
        mode: ``"exact"``, ``"sketch"`` or ``"local"``.
        group: the process group (``None``: the default group).
        world: number of ranks.
        rank: this process's rank in the group.
        sketch_size: k, the numbers per task and layer of a sketch.
        bytes_sent: numbers all-reduced so far, in bytes (what this rank contributed; a gauge of the cost).
    """

    mode: SyncMode
    group: Any
    world: int
    rank: int
    sketch_size: int
    bytes_sent: int = 0

    @classmethod
    def resolve(cls, model: nn.Module | None, mode: str, group: Any, sketch_size: int) -> Sync | None:
        """The sync of a run: ``None`` when torch.distributed is not initialised or has a single rank. The group
        is ``group``, else the DDP wrapper's, else the default one."""
        if mode not in SYNC_MODES:
            raise ValueError(f"sync must be one of {list(SYNC_MODES)}, got {mode!r}")
        if isinstance(sketch_size, bool) or not isinstance(sketch_size, int) or sketch_size < 1:
            raise ValueError(f"sketch_size must be a positive integer, got {sketch_size!r}")
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError("process_group= was given but torch.distributed is not initialised")
            return None
        if group is None and isinstance(model, nn.parallel.DistributedDataParallel):
            group = model.process_group
        world = dist.get_world_size(group)
        if world < 2:
            return None
        return cls(mode, group, world, dist.get_rank(group), sketch_size)  # type: ignore[arg-type]

    @property
    def is_global(self) -> bool:
        """Whether the reports describe the global batch (every mode but ``"local"``)."""
        return self.mode != "local"

    def all_reduce(self, tensor: Tensor, op: Any = None) -> Tensor:
        """All-reduce ``tensor`` in place (sum by default) and count the bytes."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return tensor

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over the ranks (a new tensor)."""
        return self.all_reduce(tensor.clone()) / self.world

    def all_true(self, flags: Tensor) -> Tensor:
        """Element-wise: true only where every rank's flag is true (so that every rank decides alike)."""
        return self.all_reduce(flags.to(torch.int32), dist.ReduceOp.MIN).bool()

    def largest(self, values: Tensor) -> Tensor:
        """Element-wise: the largest of the ranks' ``values`` (a new tensor), so that every rank decides on the same
        numbers (the measuring strategy, from each candidate's slowest rank)."""
        return self.all_reduce(values.clone(), dist.ReduceOp.MAX)

    def rows(self, values: list[int], device: torch.device) -> list[list[int]]:
        """Every rank's ``values`` (small integers, the same number on every rank), in rank order, from one
        all-reduce of ``R x len(values)`` integers: what each rank must know of the others before measuring (their
        numbers of ``sample_ids``, fingerprints of what their graphs hold)."""
        rows = torch.zeros(self.world, len(values), dtype=torch.int64, device=device)
        rows[self.rank] = torch.tensor(values, dtype=torch.int64)
        return [[int(v) for v in row] for row in self.all_reduce(rows).tolist()]

    def gather_samples(self, samples: SampleAttribution, counts: list[int]) -> SampleAttribution:
        """Every rank's examples, in rank order (``counts``: each rank's number), from one
        all-gather: each rank sends its ids, contributions and within-example Grams packed as bytes, padded to
        the largest rank's number of examples. The Gram, parameters and omissions are this rank's (every rank's
        are the same)."""
        N, T = samples.contribution.shape[:2]
        values = torch.cat([samples.contribution.reshape(N, -1), samples.within.reshape(N, -1)], dim=1)
        ids = samples.ids.to(values.device)[:, None]
        packed = torch.cat([ids.view(torch.uint8), values.view(torch.uint8)], dim=1)  # [N, 8 + 2 T^2 bytes]
        padded = packed.new_zeros(max(counts), packed.shape[1])
        padded[:N] = packed
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.bytes_sent += padded.numel()
        dist.all_gather(parts, padded, group=self.group)
        rows = torch.cat([part[:n] for part, n in zip(parts, counts)])
        everyone = rows[:, 8:].contiguous().view(values.dtype).reshape(-1, 2, T, T)
        return replace(
            samples, ids=rows[:, :8].contiguous().view(torch.int64).reshape(-1).to(samples.ids.device),
            contribution=everyone[:, 0], within=everyone[:, 1],
        )

    def reduction(self, step: int) -> Reduction | None:
        """How this step's per-task gradients become Grams; ``None`` for ``"local"`` (the rules' own Grams)."""
        if self.mode == "local":
            return None
        return Reduction(self, step)


@dataclass
class Reduction:
    """Turns a step's per-task gradients, layer by layer, into global Grams (see the module's docstring).

    :meth:`add` takes the complete per-task gradients ``[T, P]`` of one block of a layer's parameters (blocks of
    one layer add up); :meth:`grams` gives every layer's global Gram once the pass is over.
    """

    sync: Sync
    step: int
    _grams: dict[str, Tensor] = field(default_factory=dict)
    _sketches: dict[str, Tensor] = field(default_factory=dict)
    _blocks: dict[str, int] = field(default_factory=dict)

    def add(self, layer: str, rows: Tensor) -> Tensor | None:
        """Add one block of ``layer``: the T tasks' gradients of some of its parameters, ``[T, P]``, this rank's.
        ``rows`` is consumed (reduced in place): every caller hands over a tensor of its own. Returns the global
        gradients (``rows`` itself, now their mean over the ranks) in the exact mode, ``None`` in the sketch."""
        if self.sync.mode == "exact":
            # All ranks reach the layers in the same order (the same model and graph), so the collectives match.
            total = self.sync.all_reduce(rows).div_(self.sync.world)  # no parameter-sized copy
            gram = gram_of(total)
            self._grams[layer] = self._grams[layer] + gram if layer in self._grams else gram
            return total
        block = self._blocks.get(layer, 0)
        self._blocks[layer] = block + 1
        sketch = self._sketch(rows, f"{layer}#{block}")
        self._sketches[layer] = self._sketches[layer] + sketch if layer in self._sketches else sketch
        return None

    def restart(self) -> Reduction:
        """A fresh reduction of the same step: a measuring pass that failed midway, on every rank alike, is run again
        by another route, whose blocks must not add to what the failed one reduced."""
        return Reduction(self.sync, self.step)

    def _sketch(self, rows: Tensor, key: str) -> Tensor:
        """CountSketch of each task's row to k buckets, the same hashing on every rank for this step and block."""
        T, P = rows.shape
        k = self.sync.sketch_size
        generator = torch.Generator(device=rows.device)
        generator.manual_seed((zlib.crc32(key.encode()) * 1_000_003 + self.step) % (2**63 - 1))
        buckets = torch.randint(k, (P,), generator=generator, device=rows.device)
        signs = torch.randint(2, (P,), generator=generator, device=rows.device).to(rows.dtype).mul_(2).sub_(1)
        return rows.new_zeros(T, k).index_add_(1, buckets, rows * signs)

    def grams(self) -> dict[str, Tensor]:
        """Every layer's global Gram (sketch: one all-reduce of all the layers' sketches, here)."""
        if self.sync.mode == "exact":
            return self._grams
        names = sorted(self._sketches)  # the same order on every rank
        if not names:
            return {}
        stacked = self.sync.mean(torch.stack([self._sketches[n] for n in names]))  # [L, T, k]
        grams = stacked @ stacked.transpose(1, 2)
        return {n: grams[i] for i, n in enumerate(names)}

