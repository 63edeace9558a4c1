"""Activation checkpointing under measurement.

``torch.utils.checkpoint(fn, *args, use_reentrant=False)`` keeps the segment's graph and recomputes only the
tensors it saved: the taps of the original forward stay in the graph, and the recomputation inside a backward
is not tapped again (see :class:`gradconflict.measure.capture.Capture`). Nothing more is needed for it.

``use_reentrant=True`` runs the segment's forward without a graph; its backward recomputes the segment and calls
``backward()`` on the result, which refuses to run inside ``torch.autograd.grad``. While the monitor measures,
:func:`measuring_segments` lets a handler take that backward over: it recomputes the segment exactly as the
checkpoint does (same RNG state, same autocast state), tapped, and runs ``torch.autograd.grad`` through it, so
that the segment's layers report their per-task gradients like any other. Outside a measurement the checkpoint
runs untouched.

A recomputation runs the segment's forward again, which updates running statistics (BatchNorm in training mode)
and parametrisations' buffers as the checkpoint's own recomputation does: :class:`BufferGuard` puts the
recomputed modules' buffers back afterwards, so that they end the step as in a loop without the monitor.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.checkpoint import CheckpointFunction, detach_variable, set_device_states
from torch.utils.hooks import RemovableHandle

from gradconflict.measure.graph import walk_graph

__all__ = ["BufferGuard", "measuring_segments", "recompute", "segment_leaves", "segment_module"]

SegmentHandler = Callable[[Any, tuple[Tensor, ...]], tuple[Tensor | None, ...]]

_ORIGINAL_BACKWARD = CheckpointFunction.backward
_state = threading.local()
_lock = threading.Lock()
_installed = 0


def _backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
    handler = getattr(_state, "handler", None)
    if handler is None:
        return _ORIGINAL_BACKWARD(ctx, *grads)
    return handler(ctx, grads)


@contextlib.contextmanager
def measuring_segments(handler: SegmentHandler) -> Iterator[None]:
    """While active (in this thread), a reentrant checkpoint's backward calls ``handler(ctx, grads)`` instead,
    which must return the gradients of the checkpoint's inputs (``(None, None, *input_grads)``)."""
    global _installed
    with _lock:
        if _installed == 0:
            CheckpointFunction.backward = staticmethod(_backward)  # type: ignore[method-assign]
        _installed += 1
    previous = getattr(_state, "handler", None)
    _state.handler = handler
    try:
        yield
    finally:
        _state.handler = previous
        with _lock:
            _installed -= 1
            if _installed == 0:
                CheckpointFunction.backward = staticmethod(_ORIGINAL_BACKWARD)  # type: ignore[method-assign]


def recompute(ctx: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Run a reentrant checkpoint's segment again as its own backward would: the forward's RNG state and
    autocast state, gradients enabled, from detached copies of its inputs. Returns ``(inputs, outputs)``."""
    inputs = list(ctx.inputs)
    for i, idx in enumerate(ctx.tensor_indices):
        inputs[idx] = ctx.saved_tensors[i]
    devices = ctx.fwd_devices if ctx.preserve_rng_state and ctx.had_device_in_fwd else []
    with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng_state, device_type=ctx.device_type):
        if ctx.preserve_rng_state:
            torch.set_rng_state(ctx.fwd_cpu_state)
            if ctx.had_device_in_fwd:
                set_device_states(ctx.fwd_devices, ctx.fwd_device_states, device_type=ctx.device_type)
        detached = detach_variable(tuple(inputs))  # (requires_grad_() is refused inside vmap)
        device_autocast = (
            torch.amp.autocast(device_type=ctx.device_type, **ctx.device_autocast_kwargs)
            if torch.amp.is_autocast_available(ctx.device_type)
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), device_autocast, torch.amp.autocast("cpu", **ctx.cpu_autocast_kwargs):
            outputs = ctx.run_function(*detached)
    return detached, (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


def segment_module(node: Any) -> nn.Module | None:
    """The module a reentrant checkpoint's segment runs (``checkpoint(block, x)``, ``checkpoint(block.__call__,
    x)``, or a ``functools.partial`` of one), or ``None`` for any other function."""
    run = node.run_function
    owner = run if isinstance(run, nn.Module) else getattr(run, "__self__", getattr(run, "func", None))
    return owner if isinstance(owner, nn.Module) else None


def segment_leaves(node: Any, model: nn.Module) -> list[Tensor]:
    """The leaves (parameters) a reentrant checkpoint's segment uses.

    A segment that runs a module (``checkpoint(block, x)`` or ``checkpoint(block.__call__, x)``, as Hugging Face
    models do) uses that module's parameters. Any other function is recomputed once, with the RNG and the
    model's buffers left as they were, and its graph walked (nested checkpoints included).
    """
    owner = segment_module(node)
    if owner is not None:
        return [p for p in owner.parameters() if p.requires_grad]
    with BufferGuard(model):
        inputs, outputs = recompute(node)
    graph = walk_graph([t for t in outputs if isinstance(t, Tensor) and t.requires_grad])
    exclude = {id(t) for t in inputs if isinstance(t, Tensor)}
    found = [t for t in graph.leaves if id(t) not in exclude]
    for inner in graph.checkpoints:
        found += segment_leaves(inner, model)
    return found


class BufferGuard:
    """Puts back the buffers of the model's modules that run a forward inside the block (activation
    checkpointing recomputes segments there).

    While the block runs, a global forward pre-hook copies the own buffers of each module of the model the first
    time it is called, and the copies are put back afterwards: a block that recomputes nothing (no checkpoint in the
    step, the usual case) copies nothing, and one that does copies only the recomputed modules' buffers
    (running statistics, a spectral norm's power-iteration vectors). Cheaper schemes miss changes: BatchNorm
    updates its running statistics without bumping their version counter. The copy back goes through ``.data``, so
    that it does not bump the version either: a buffer the graph saved (eval-mode BatchNorm) gets its own value back
    and the backward that writes ``.grad`` accepts it. A buffer a module replaced instead of updating is put back
    too. A buffer changed outside any module's forward is not seen.
    """

    def __init__(self, model: nn.Module | Iterable[nn.Module]) -> None:
        self.model = model  # the model, or its modules
        self._saved: dict[nn.Module, dict[str, tuple[Tensor, Tensor]]] = {}
        self._members: set[int] | None = None
        self._handle: RemovableHandle | None = None

    @property
    def copied(self) -> int:
        """Bytes copied so far in the current block."""
        return sum(c.numel() * c.element_size() for saved in self._saved.values() for _, c in saved.values())

    def _before(self, module: nn.Module, args: Any) -> None:
        if module in self._saved:
            return
        if self._members is None:  # built on the first recomputation only: most blocks have none
            modules = self.model.modules() if isinstance(self.model, nn.Module) else self.model
            self._members = {id(m) for m in modules}
        if id(module) in self._members:
            with torch.no_grad():
                self._saved[module] = {
                    name: (b, b.detach().clone()) for name, b in module._buffers.items() if isinstance(b, Tensor)
                }

    def __enter__(self) -> BufferGuard:
        self._saved, self._members = {}, None
        self._handle = register_module_forward_pre_hook(self._before)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for module, saved in self._saved.items():
            for name, (buffer, copy) in saved.items():
                buffer.data.copy_(copy)
                module._buffers[name] = buffer
        self._saved, self._members = {}, None
