"""Capture: taps on the output of each rule-covered module, inserted by a forward hook.

A tap is an identity autograd node placed on a module's output during the forward. During the engine's batched
backward it unwraps the module's vmapped output gradient into the plain ``[T, ...]`` tensor of all T tasks'
gradients and hands it to the engine's current pass; outside that pass it passes gradients through untouched.
Every tap also feeds a scalar *anchor*: asking autograd for the anchor's gradient makes the backward visit every
tapped layer while computing no weight gradient.

The hook is a *global* module forward hook (``torch.nn.modules.module.register_module_forward_hook``) that
only acts on the modules of the monitored model. Nothing is stored on the model, so ``torch.save``,
``copy.deepcopy`` and pickling of the model work while a monitor is attached and a copy carries no tap. A
global hook also runs before every hook registered on the module itself, so the tap sees the module's own
output even when a user's forward hook rewrites it; it is moved ahead of the global hooks registered before it
(see :meth:`GlobalForwardHook.register`). It is registered only while the next forward is to be measured (see
:meth:`Capture.arm`), and removed when the monitor closes or is garbage-collected.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
>>> capture = Capture(model)
>>> capture.arm(True)
>>> y = model(torch.ones(1, 2))
>>> type(y.grad_fn.next_functions[0][0]).__name__
'_TapBackward'
>>> capture.close()
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from torch._C import _functorch as functorch
from torch.nn.modules import module as nn_module
from torch.nn.modules.module import register_module_forward_hook
from torch.utils.hooks import RemovableHandle

from gradconflict.measure.rules import Call, LayerRule, rule_for

__all__ = ["Capture", "GlobalForwardHook", "OutputCapture", "RetainedGrads", "is_tap_anchor", "task_batch"]

#: Every capture's anchors: leaves that autograd sees in the monitored graph but that are not the user's.
_ANCHORS: weakref.WeakSet[Tensor] = weakref.WeakSet()


def is_tap_anchor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is the anchor of some capture: a leaf of the graph that its taps add, whose gradient is
    always zero and that no user reads (the weighted backward does not count it as a parameter of its own).

    >>> import torch, torch.nn as nn
    >>> is_tap_anchor(Capture(nn.Linear(2, 2)).anchor(torch.device("cpu"))), is_tap_anchor(torch.zeros(()))
    (True, False)
    """
    return tensor in _ANCHORS


class Receiver(Protocol):
    """What the engine's pass offers the taps."""

    num_tasks: int

    def receive(self, call: Call, grads: Tensor) -> None: ...


def task_batch(grad: Tensor, num_tasks: int) -> Tensor:
    """The plain ``[T, ...]`` tensor behind a vmapped gradient seen during the batched backward.

    Inside ``torch.func.vmap`` the gradient is a BatchedTensor: one tensor holding every task's gradient along a
    batch dimension. Unwrapping it directly (functorch's own accessors) costs nothing, where routing it through
    an ``autograd.Function`` with a ``vmap`` rule costs about 0.4 ms of Python per layer. A gradient that does not
    depend on the task (not batched) is the same for every task.
    """
    if functorch.is_batchedtensor(grad):
        return functorch.get_unwrapped(grad).movedim(functorch.maybe_get_bdim(grad), 0)
    return grad.expand(num_tasks, *grad.shape)


def _report(ctx: Any, grad: Tensor) -> Tensor | None:
    """Hand ``grad`` to the capture's active pass, if any; the anchor's gradient (zero when reported)."""
    capture = ctx.gc_capture()
    receiver = None if capture is None else capture.receiver
    if receiver is None:
        return None
    receiver.receive(ctx.gc_call, task_batch(grad, receiver.num_tasks))
    return grad.new_zeros(())


class _Tap(torch.autograd.Function):
    """Identity on a module's output that reports the output's gradient to the active pass, if any."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, call: Call, capture: weakref.ref[Capture]) -> Tensor:
        ctx.gc_call = call
        ctx.gc_capture = capture
        # A detached alias, not a view: users may modify the output in place (ReLU(inplace=True)).
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        return grad, _report(ctx, grad), None, None


class _TransformTap(torch.autograd.Function):
    """The same tap, applied inside a functorch transform: a checkpointed segment recomputed inside the batched
    backward. Transforms need the ``setup_context`` style and a ``vmap`` rule, which cost a signature binding per
    call, so ordinary forwards use :class:`_Tap`."""

    @staticmethod
    def forward(output: Tensor, anchor: Tensor, call: Call, capture: weakref.ref[Capture]) -> Tensor:
        return output.detach()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.gc_call = inputs[2]
        ctx.gc_capture = inputs[3]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        return grad, _report(ctx, grad), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], output: Tensor, anchor: Tensor, call: Call, capture: Any) -> Any:
        return _TransformTap.apply(output, anchor, call, capture), in_dims[0]


#: Each module class's input name, read once (a class's forward signature does not change).
_INPUT_NAMES: dict[type[nn.Module], str | None] = {}


def _input_name(cls: type[nn.Module]) -> str | None:
    """The name of the first argument of ``cls.forward`` (its input), for calls that pass it by keyword."""
    if cls not in _INPUT_NAMES:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        first = params[0] if params else None
        _INPUT_NAMES[cls] = None if first is None or first.kind is inspect.Parameter.VAR_POSITIONAL else first.name
    return _INPUT_NAMES[cls]


def _input_of(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    name = _input_name(type(module))
    return None if name is None else kwargs.get(name)


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
        # torch 2.13's handle leaves its id in the with-kwargs registry: without this, every arming would grow it
        # and torch.compile would keep warning about global hooks after the monitor is gone.
        getattr(nn_module, "_global_forward_hooks_with_kwargs", {}).pop(handle.id, None)
    handles.clear()


class GlobalForwardHook:
    """A global module forward hook (with keyword arguments), registered and removed on demand.

    ``hook(module, args, kwargs, output)`` runs for every module call in the process while registered; it is
    removed by :meth:`remove`, and at the latest when this object is garbage-collected.
    """

    def __init__(self, hook: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]) -> None:
        self._hook = hook
        self._handles: list[RemovableHandle] = []
        weakref.finalize(self, _remove_all, self._handles)

    @property
    def registered(self) -> bool:
        """Whether the hook is registered now."""
        return bool(self._handles)

    def register(self) -> None:
        """Register the hook (once), ahead of every global forward hook registered before it: global hooks run in
        registration order, and one that rewrites a module's output (``register_module_forward_hook``, as some
        quantisation and adapter libraries do) must not run before the hook sees the module's own output."""
        if not self._handles:
            handle = register_module_forward_hook(self._hook, with_kwargs=True)
            hooks = cast("OrderedDict[int, Any]", nn_module._global_forward_hooks)
            hooks.move_to_end(handle.id, last=False)
            self._handles.append(handle)

    def remove(self) -> None:
        """Remove the hook."""
        _remove_all(self._handles)


_FUSED_ATTENTION = ("flash", "mem_efficient", "cudnn")


def _fused_attention(enabled: dict[str, bool] | None = None) -> dict[str, bool]:
    """Which fused scaled-dot-product-attention kernels torch may pick (process-wide flags); with ``enabled``,
    set them and return what they were."""
    backends = torch.backends.cuda
    before = {k: getattr(backends, f"{k}_sdp_enabled")() for k in _FUSED_ATTENTION}
    for k, on in (enabled or {}).items():
        getattr(backends, f"enable_{k}_sdp")(on)
    return before


class Capture:
    """Taps the output of every module of ``model`` that a layer rule covers, on the forwards it is armed for.

    With ``math_attention``, armed forwards also run scaled-dot-product attention with torch's math kernel
    (the fused kernels' backwards have no batching rule on CPU, so the batched pass would loop over the tasks
    there). This changes those forwards' rounding (about 1e-7) and is process-wide while armed, so it is opt-in;
    the flags are put back when disarmed.

    Attributes:
        receiver: the engine pass that taps report to during its batched backward (``None`` otherwise).
        recomputing: above zero while the engine recomputes a checkpointed segment inside its backward; forwards
            that run inside a backward are otherwise the recomputation of activation checkpointing, which must
            not be tapped again.
    """

    def __init__(self, model: nn.Module, math_attention: bool = False) -> None:
        self.receiver: Receiver | None = None
        self.recomputing = 0
        self.math_attention = math_attention
        self._attention: dict[str, bool] | None = None  # the fused-attention flags to put back
        self._rules: dict[nn.Module, LayerRule] = {}
        for module in model.modules():
            rule = rule_for(module)
            if rule is not None and rule.params(module):
                self._rules[module] = rule
        self._active = dict(self._rules)
        self._anchors: dict[torch.device, Tensor] = {}
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Tensor | None:
            capture = ref()
            return None if capture is None else capture._tap(module, args, kwargs, output)

        self._hook = GlobalForwardHook(hook)

    def _tap(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Tensor | None:
        rule = self._active.get(module)
        if (
            rule is None
            or not isinstance(output, Tensor)
            or not output.requires_grad
            or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or (torch._C._current_graph_task_id() != -1 and not self.recomputing)
        ):
            return None
        x = _input_of(module, args, kwargs)
        if not isinstance(x, Tensor):
            return None
        table = module._parameters
        used = {name: id(table.get(name)) for name in rule.param_names}
        size = output.numel() * output.element_size()
        call = Call(module, rule, rule.save(module, x, output), owner=self, used=used, output_bytes=size)
        tap = _Tap if functorch.peek_interpreter_stack() is None else _TransformTap
        return tap.apply(output, self.anchor(output.device), call, weakref.ref(self))

    def arm(self, on: bool) -> None:
        """Tap the coming forwards (``True``) or leave them plain (``False``: no hook is registered at all)."""
        if on:
            self._hook.register()
            if self.math_attention and self._attention is None:
                self._attention = _fused_attention({k: False for k in _FUSED_ATTENTION})
        else:
            self._hook.remove()
            if self._attention is not None:
                _fused_attention(self._attention)
                self._attention = None

    @property
    def armed(self) -> bool:
        """Whether the coming forwards are tapped."""
        return self._hook.registered

    def restrict(self, shared: set[int]) -> None:
        """Tap only the modules that hold one of the ``shared`` parameters (by id)."""
        self._active = {
            m: rule for m, rule in self._rules.items() if any(id(p) in shared for p in rule.params(m).values())
        }

    def taps(self, module: nn.Module) -> bool:
        """Whether forwards of ``module`` are tapped (once restricted: whether it holds a shared parameter)."""
        return module in self._active

    def anchor(self, device: torch.device) -> Tensor:
        """The scalar leaf every tap on ``device`` feeds (its gradient is always zero)."""
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
            _ANCHORS.add(self._anchors[device])
        return self._anchors[device]

    def is_anchor(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is one of this capture's anchors."""
        return any(tensor is a for a in self._anchors.values())

    def close(self) -> None:
        """Stop tapping: remove the hook (and put the attention flags back)."""
        self.arm(False)


class OutputCapture:
    """Keeps the latest output of one module (the shared representation, for ``engine="representation"``)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.name = name
        self.output: Tensor | None = None
        target, ref = module, weakref.ref(self)

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            capture = ref()
            if m is target and capture is not None and isinstance(output, Tensor) and output.requires_grad:
                if torch._C._current_graph_task_id() == -1:  # not a checkpoint's recomputation
                    capture.output = output

        self._hook = GlobalForwardHook(hook)
        self._hook.register()

    def close(self) -> None:
        """Remove the hook and drop the kept output."""
        self._hook.remove()
        self.output = None


_ORIGINAL_RETAIN_GRAD = torch.Tensor.retain_grad
_retaining: dict[int, weakref.ref[Tensor]] = {}  # id -> the non-leaf tensors retain_grad() was called on
_retain_lock = threading.Lock()
_retain_users = 0


def _retain_grad(self: Tensor) -> None:
    _ORIGINAL_RETAIN_GRAD(self)
    if not self.is_leaf:
        key = id(self)

        def forget(_: object, key: int = key) -> None:
            _retaining.pop(key, None)

        _retaining[key] = weakref.ref(self, forget)


class RetainedGrads:
    """Keeps the ``.grad`` of activations on which ``retain_grad()`` was called out of a measuring backward.

    Autograd fills a retained activation's ``.grad`` in every backward that runs through it, ``torch.autograd.grad``
    included: without this, the measurement would add each task's gradient to it (the per-task loop) or leave a
    vmapped tensor there (the batched backward), and the training backward after it would fail half-way through
    ``.grad``. While at least one :class:`RetainedGrads` is open, ``Tensor.retain_grad`` also notes the tensor
    (weakly); :meth:`kept` puts every noted tensor's ``.grad`` back as it was before the block. An activation
    retained before any engine existed is not noted.

    >>> keeper = RetainedGrads()
    >>> x = torch.ones(2, requires_grad=True)
    >>> h = x * 2
    >>> h.retain_grad()
    >>> with keeper.kept():
    ...     _ = torch.autograd.grad(h.sum(), x, retain_graph=True)
    >>> h.grad is None
    True
    >>> keeper.close()
    """

    def __init__(self) -> None:
        global _retain_users
        with _retain_lock:
            if _retain_users == 0:
                torch.Tensor.retain_grad = _retain_grad  # type: ignore[method-assign,assignment]
            _retain_users += 1
        self._finalizer = weakref.finalize(self, RetainedGrads._release)

    @staticmethod
    def _release() -> None:
        global _retain_users
        with _retain_lock:
            _retain_users -= 1
            if _retain_users == 0:
                torch.Tensor.retain_grad = _ORIGINAL_RETAIN_GRAD  # type: ignore[method-assign]
                _retaining.clear()

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Run the block, then give every retained activation its ``.grad`` from before it."""
        saved = [(t, t.grad) for t in (ref() for ref in list(_retaining.values())) if t is not None and t.retains_grad]
        try:
            yield
        finally:
            for tensor, grad in saved:
                tensor.grad = grad

    def close(self) -> None:
        """Stop noting (once the last keeper is closed, ``Tensor.retain_grad`` is torch's own again)."""
        self._finalizer()
