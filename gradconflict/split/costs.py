"""Running costs of a model: parameter bytes, training-step memory, and inference latency per batch.

On CUDA the memory is the allocator's peak; on CPU, where PyTorch keeps no such count, it is an estimate:
parameters, gradients, optimizer state and the activations autograd saves for the backward pass.

>>> import torch, torch.nn as nn
>>> model = nn.Linear(4, 2)
>>> with saved_activation_bytes(model) as saved:
...     model(torch.randn(8, 4)).sum().backward()
>>> saved.bytes                           # the input, saved to compute the weight's gradient
128
>>> latency_ms(model, torch.randn(8, 4), repeats=2) > 0
True
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SavedBytes", "latency_ms", "saved_activation_bytes", "state_bytes", "synchronize"]


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


def latency_ms(model: nn.Module, x: Any, repeats: int = 10) -> float:
    """Fastest wall-clock milliseconds of one inference call ``model(x)``: eval mode, no grad, after a warm-up.

    The fastest of ``repeats`` calls, because a busy machine only ever adds time: the minimum is the estimate
    least disturbed by other processes.

    The model is put back in the mode it was in.

    >>> latency_ms(nn.Identity(), torch.zeros(1)) >= 0
    True
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            model(x)
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                model(x)
                synchronize(device)
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return min(times)
