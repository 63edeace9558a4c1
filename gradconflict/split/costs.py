"""Running costs of a model: parameter bytes, training-step memory, and timings.

On CUDA the memory is the allocator's peak; on CPU, where PyTorch keeps no such count, it is an estimate:
parameters, gradients, optimizer state and the activations autograd saves for the backward pass.

Timings are taken round-robin over the things compared (:func:`interleaved_ms`), as medians, with the process's
CPU time beside the wall time: a machine whose load changes during the measurement then slows every variant
alike, and the CPU time hardly moves with the load at all.

>>> import torch, torch.nn as nn
>>> model = nn.Linear(4, 2)
>>> with saved_activation_bytes(model) as saved:
...     model(torch.randn(8, 4)).sum().backward()
>>> saved.bytes                           # the input, saved to compute the weight's gradient
128
>>> timings = interleaved_ms({"small": lambda: model(torch.randn(8, 4))}, repeats=3)
>>> timings["small"].wall > 0 and timings["small"].cpu >= 0
True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["SavedBytes", "Timing", "interleaved_ms", "saved_activation_bytes", "state_bytes", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock timings mean something on CUDA.

    >>> synchronize(torch.device("cpu"))  # nothing to wait for on the CPU
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedBytes:
    """Running total of the bytes of the distinct tensors autograd saved (storages in ``exclude`` left out).

    >>> counter = SavedBytes(exclude=set())
    >>> _ = counter.pack(torch.zeros(4)); _ = counter.pack(torch.zeros(4))
    >>> counter.bytes
    32
    """

    def __init__(self, exclude: set[int]) -> None:
        self.bytes = 0
        self._seen = set(exclude)

    def pack(self, tensor: Tensor) -> Tensor:
        """Count the bytes of a tensor autograd saves (each storage once) and keep it unchanged."""
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:  # count each storage once, views included
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor


@contextmanager
def saved_activation_bytes(model: nn.Module) -> Iterator[SavedBytes]:
    """Count the bytes autograd saves for backward inside the block (``model``'s parameters left out).

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with saved_activation_bytes(model) as saved:
    ...     _ = model(torch.zeros(3, 2, requires_grad=True)).sum()
    >>> saved.bytes
    24
    """
    counter = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the parameters, their gradients and the optimizer's state tensors.

    >>> import torch, torch.nn as nn
    >>> state_bytes(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    24
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
    return total


class Timing(NamedTuple):
    """Median milliseconds of one call: wall-clock time, and the process's CPU time (all its threads)."""

    wall: float
    cpu: float


def interleaved_ms(
    calls: Mapping[str, Callable[[], Any]], repeats: int = 9, device: torch.device | None = None
) -> dict[str, Timing]:
    """Time each call ``repeats`` times, round-robin (one call of each in turn, then again), after one warm-up
    round: the median wall-clock and CPU milliseconds of each.

    Round-robin, because a change in the machine's load then falls on every call alike instead of on whichever
    ran at that moment; the median, because a busy machine adds spikes; CPU time (``time.process_time``), because
    it counts the work done rather than the time waited for a core. On the CPU the calls run on one thread (the
    thread count is restored after): the cost of the work itself, which a shared machine's load cannot
    multiply through the thread pool. On CUDA the device is synchronised around each call.

    >>> t = interleaved_ms({"a": lambda: sum(range(1000)), "b": lambda: None}, repeats=3)
    >>> sorted(t), t["a"].wall >= 0
    (['a', 'b'], True)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = device or torch.device("cpu")
    walls: dict[str, list[float]] = {name: [] for name in calls}
    cpus: dict[str, list[float]] = {name: [] for name in calls}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # one thread: idle pool threads spin for a core between calls, which on a loaded machine inflated both
        # clocks of whichever call came next, several times over; one thread times the work alone
        torch.set_num_threads(1)
    try:
        for round_ in range(repeats + 1):
            for name, call in calls.items():
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                call()
                synchronize(device)
                if round_:  # round 0 warms up
                    walls[name].append((time.perf_counter() - wall) * 1e3)
                    cpus[name].append((time.process_time() - cpu) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {name: Timing(statistics.median(walls[name]), statistics.median(cpus[name])) for name in calls}
