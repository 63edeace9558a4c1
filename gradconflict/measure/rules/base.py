"""The rule interface and the registry keyed by module type."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from einops import einsum
from torch import Tensor, nn

__all__ = [
    "EXAMPLE_CHUNK_BYTES",
    "Call",
    "LayerAttribution",
    "LayerGram",
    "LayerRule",
    "MEMORY_COST",
    "NotPerExample",
    "PIECE_BYTES",
    "Scratch",
    "attribution_of",
    "check_examples",
    "gram_of",
    "materialised_gram",
    "per_example_attribution",
    "register_rule",
    "rule_for",
    "task_blocks",
    "task_rows",
]

_REGISTRY: dict[type[nn.Module] | str, LayerRule[Any]] = {}

R = TypeVar("R", bound="type[LayerRule[Any]]")
#: The module type a rule handles (its methods receive modules of that type).
M = TypeVar("M", bound=nn.Module)

#: Bytes of per-example gradients a rule holds at once while attributing (it works through the examples in
#: chunks of this size).
EXAMPLE_CHUNK_BYTES = 64 * 2**20

#: Bytes of per-example weight gradients formed by one matrix product while attributing
#: (:func:`per_example_attribution`): small enough to be reduced while in cache, and for the allocator to reuse
#: the block from piece to piece.
PIECE_BYTES = 8 * 2**20

#: Multiply-adds that one number written to memory and read back costs as much time as, in the rules' choices of
#: an attribution route: measured on a 2-core x86 CPU, where forming the per-example weight gradients of a
#: convolution with 64 output positions took about as long as the per-task backward and one forward convolution.
MEMORY_COST = 48


@dataclass(eq=False)
class Call:
    """One forward call of a tapped module: what the rule recorded then, and (later) its output gradients.

    ``saved`` is the rule's own record of the call (:meth:`LayerRule.save`: the input, and any module state the
    rule needs, taken at forward time); ``owner`` is the capture that tapped it; ``used`` maps each covered
    parameter name to the id of the tensor the module held under it during the call (``torch.func.functional_call``
    substitutes others: a rule then covers only the names whose tensor is the graph's leaf); ``grads`` is
    ``[T, *output.shape]``, the output gradient of every task, filled in when the batched backward reaches this
    call. Both are dropped as soon as the rule has run (``saved`` becomes ``None``). ``output_bytes``: the size of
    the call's output, which each task's output gradient has too.
    """

    module: nn.Module
    rule: LayerRule[Any]
    saved: Any
    owner: object = field(default=None, repr=False)
    used: dict[str, int] = field(default_factory=dict, repr=False)
    grads: Tensor | None = field(default=None, repr=False)
    output_bytes: int = field(default=0, repr=False)

    @property
    def output_grads(self) -> Tensor:
        """``grads``, which the batched backward has filled in by the time the rule runs."""
        if self.grads is None:
            name = type(self.module).__name__
            raise RuntimeError(f"a call of {name} has no output gradients: its rule ran before the backward reached it")
        return self.grads

    def release(self) -> None:
        """Drop the recorded input and the output gradients (the rule has run, or never will)."""
        self.saved = None
        self.grads = None


class LayerRule(Generic[M]):
    """Turns a module's calls into its per-task parameter gradients, or straight into their Gram.

    Subclasses set ``param_names`` and implement :meth:`per_task`; :meth:`gram` takes the Gram of what
    :meth:`per_task` gives unless a subclass knows a cheaper route (the Linear ghost kernel). :meth:`save`
    records what the rule needs from the forward (by default the input, detached).
    """

    #: names of the module's parameters this rule covers (e.g. ``("weight", "bias")``)
    param_names: tuple[str, ...] = ()

    def params(self, module: M) -> dict[str, nn.Parameter]:
        """The covered parameters of ``module`` that exist and require grad.

        Read from the module's own parameter table, never by attribute: a parametrised weight
        (``torch.nn.utils.parametrize``, ``spectral_norm``) is computed on attribute access, which would run its
        parametrisation (a power iteration that moves buffers) outside the user's forward. Such a weight is not a
        leaf, so no rule covers it: its ``original`` takes the engine's generic route.
        """
        out = {}
        for name in self.param_names:
            p = module._parameters.get(name)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                out[name] = p
        return out

    def accepts(self, module: M) -> bool:
        """Whether this rule can handle this particular module instance (e.g. not a sparse Embedding)."""
        return True

    def save(self, module: M, input: Tensor, output: Tensor) -> Any:
        """What to keep from a forward call: by default its input, detached (autograd keeps it too). A rule whose
        result depends on module state (training mode, running statistics) records that state here."""
        return input.detach()

    def per_task(
        self, module: M, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """The per-task gradients ``{name: [T, *parameter.shape]}`` of the parameters ``names`` (a subset of
        :meth:`params`), summed over every call; each ``call.grads`` is ``[T, *output.shape]``. In ``dtype``."""
        raise NotImplementedError

    def gram(self, module: M, calls: Sequence[Call], names: set[str], gram_dtype: torch.dtype) -> LayerGram:
        """The Gram of the per-task gradients of the parameters ``names`` over every call, in ``gram_dtype``."""
        return materialised_gram(self.per_task(module, calls, names, gram_dtype), gram_dtype)

    def per_example(
        self, module: M, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """Each example's share of each task's gradient, ``{name: [T, N, *parameter.shape]}``: the part of
        :meth:`per_task` that flows through the rows of example ``n`` (dim 0 of every call's input), so that the
        sum over ``n`` is :meth:`per_task`. A rule that does not know it leaves its layer out of the attribution."""
        raise NotImplementedError(f"{type(self).__name__} has no per-example gradients")

    def attribute(
        self, module: M, calls: Sequence[Call], names: set[str], dtype: torch.dtype,
        total: dict[str, Tensor] | None = None, scratch: Scratch | None = None,
    ) -> LayerAttribution:
        """The layer's Gram and each example's part in it (see :class:`LayerAttribution`), in ``dtype``.

        ``total``, when given, holds the per-task gradients ``{name: [T, *parameter.shape]}`` (as :meth:`per_task`
        gives them) that the contributions are taken against, in place of the layer's own sum over the examples:
        across processes, the global ones. The Gram is then theirs; the within-example Gram stays the example's.
        ``scratch``: memory shared with the step's other layers for per-example gradients (:class:`Scratch`).

        By default from :meth:`per_example`; a rule with a cheaper route (the Linear kernel) overrides it."""
        per_example = self.per_example(module, calls, names, dtype)
        T, N = next(iter(per_example.values())).shape[:2]
        rows = torch.cat([per_example[n].to(dtype).reshape(T, N, -1) for n in sorted(per_example)], dim=2)
        return attribution_of(rows, total=None if total is None else task_rows(total, dtype))


@dataclass
class LayerAttribution:
    """One module's Gram and each example's part in it, over the parameters a rule covers.

    Attributes:
        gram: ``[T, T]``, ``G_ij = <g_i, g_j>`` (the same number :meth:`LayerRule.gram` gives).
        contribution: ``[N, T, T]``, entry ``(n, i, j)`` is ``<g_i^(n), g_j>``, example ``n``'s share of
            ``G_ij``: the sum over ``n`` is ``gram``.
        within: ``[N, T, T]``, entry ``(n, i, j)`` is ``<g_i^(n), g_j^(n)>``, the Gram of example ``n`` alone.
        route: how the rule computed it.
    """

    gram: Tensor
    contribution: Tensor
    within: Tensor
    route: str

    def __add__(self, other: LayerAttribution) -> LayerAttribution:
        """The attribution over both blocks of parameters (a weight's and its bias's): the Grams and the examples'
        parts add up; the route is the first's."""
        return LayerAttribution(
            self.gram + other.gram, self.contribution + other.contribution, self.within + other.within, self.route
        )


class NotPerExample(ValueError):
    """A tapped call whose input does not hold the batch's examples along dim 0 (it cannot be attributed)."""


def check_examples(calls: Sequence[Call], examples: int) -> None:
    """Raise :class:`NotPerExample` unless dim 0 of every call's recorded input is the ``examples`` examples.

    >>> import torch.nn as nn
    >>> call = Call(nn.Linear(2, 2), None, torch.zeros(4, 2))
    >>> check_examples([call], 4)
    >>> check_examples([call], 3)
    Traceback (most recent call last):
    ...
    gradconflict.measure.rules.base.NotPerExample: its input has shape (4, 2): dim 0 is not the 3 examples
    """
    for call in calls:
        x = call.saved[0] if isinstance(call.saved, tuple) else call.saved
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] != examples:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise NotPerExample(f"its input has shape {shape}: dim 0 is not the {examples} examples")


def attribution_of(rows: Tensor, route: str = "per-example", total: Tensor | None = None) -> LayerAttribution:
    """The attribution of per-example per-task gradients ``rows`` ``[T, N, P]`` (``rows[i, n]`` is
    ``g_i^(n)``): the Gram of their sums over ``n``, each example's contribution and its own Gram. With ``total``
    (``[T, P]``, e.g. the global per-task gradients across processes), the contributions are taken against it, and
    the Gram is its own.

    >>> rows = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, -1.0]]])  # T=2 tasks, N=2 examples
    >>> a = attribution_of(rows)
    >>> a.gram.tolist(), a.contribution.sum(0).tolist()
    ([[5.0, 1.0], [1.0, 1.0]], [[5.0, 1.0], [1.0, 1.0]])
    >>> a.within[1].tolist()  # example 1 alone: the tasks point apart
    [[4.0, -2.0], [-2.0, 1.0]]
    >>> attribution_of(rows, total=2 * rows.sum(1)).contribution.sum(0).tolist()  # against another gradient
    [[10.0, 2.0], [2.0, 2.0]]
    """
    total = rows.sum(1) if total is None else total
    return LayerAttribution(
        gram=gram_of(total),
        contribution=einsum(rows, total, "t n p, s p -> n t s"),
        within=einsum(rows, rows, "t n p, s n p -> n t s"),
        route=route,
    )


class Scratch:
    """Memory for the per-example gradients that the layer rules of one attributed step form in turn
    (:func:`per_example_attribution`): each layer's are written where the previous layer's lay. A large block
    freed and allocated again comes back from the system as fresh pages, each zeroed on its first write, which
    costs about as much as writing it; reused, the step pays that once, not once per layer.

    A rule may hold a second block at once (``slot=1``: a convolution's output gradients rearranged for its
    products).

    >>> scratch = Scratch()
    >>> a = scratch.take(6, torch.zeros(0))
    >>> b = scratch.take(4, torch.zeros(0))
    >>> b.shape, a.data_ptr() == b.data_ptr(), scratch.take(4, torch.zeros(0), slot=1).data_ptr() == a.data_ptr()
    (torch.Size([4]), True, False)
    """

    def __init__(self) -> None:
        self._blocks: dict[int, Tensor] = {}

    def take(self, numel: int, like: Tensor, slot: int = 0) -> Tensor:
        """``numel`` entries in ``like``'s dtype and device, their values undefined; they stay this caller's until
        the next :meth:`take` of the same ``slot``."""
        block = self._blocks.get(slot)
        if block is None or block.numel() < numel or block.dtype != like.dtype or block.device != like.device:
            block = self._blocks[slot] = like.new_empty(numel)
        return block[:numel]


def per_example_attribution(
    rows: Callable[[int, int, Tensor], Tensor], examples: int, tasks: int, width: int, like: Tensor,
    against: Tensor | None = None, groups: int = 1, scratch: Scratch | None = None,
) -> LayerAttribution:
    """The attribution of a weight from its per-example per-task gradients, formed one piece of
    :data:`PIECE_BYTES` at a time: ``rows(a, b, out)`` writes into ``out`` (``[groups, b - a, T, width]``) the
    gradients of examples ``a:b`` (per group of a grouped convolution; ``groups=1`` otherwise), in ``like``'s dtype
    and device, and returns it. The pieces lie in ``scratch`` when given (see :class:`Scratch`).

    Each piece is reduced while it is fresh: each example's own Gram, and the running sum over the examples, which
    is the per-task gradient ``G`` (``[groups, T, width]``), so no separate per-task computation is needed. The
    contributions ``<J_i^(n), G_j>`` follow once ``G`` is complete, from the pieces kept or, beyond
    :data:`EXAMPLE_CHUNK_BYTES` of them, formed again. Against ``against`` (``[groups, T, width]``, e.g. the global
    per-task gradients across processes) they are taken piece by piece, and the Gram is ``against``'s.

    >>> J = torch.randn(3, 2, 5)  # [N, T, width]: 3 examples, 2 tasks
    >>> a = per_example_attribution(lambda a, b, out: out.copy_(J[None, a:b]), 3, 2, 5, J)
    >>> torch.allclose(a.contribution, einsum(J, J.sum(0), "n t p, s p -> n t s"), atol=1e-6), a.route
    (True, 'per-example')
    >>> torch.allclose(a.gram, J.sum(0) @ J.sum(0).T, atol=1e-5)
    True
    """
    per_example = tasks * groups * width
    step = max(1, PIECE_BYTES // (per_example * like.element_size()))
    pieces = [(a, min(a + step, examples)) for a in range(0, examples, step)]
    keep = against is None and examples * per_example * like.element_size() <= EXAMPLE_CHUNK_BYTES
    held = (examples if keep else min(step, examples)) * per_example
    store = like.new_empty(held) if scratch is None else scratch.take(held, like)

    def piece(a: int, b: int) -> Tensor:
        """The gradients of examples ``a:b``, formed where they are kept (or where the one piece at a time lies)."""
        start = a * per_example if keep else 0
        return rows(a, b, store[start : start + (b - a) * per_example].view(groups, b - a, tasks, width))

    def contributions(J: Tensor, G: Tensor) -> Tensor:
        return (J.flatten(1, 2) @ G.transpose(1, 2)).reshape(groups, -1, tasks, tasks).sum(0)

    kept, within, contribution = [], [], []
    total = like.new_zeros(groups, tasks, width)
    for a, b in pieces:
        J = piece(a, b)
        within.append((J.flatten(0, 1) @ J.flatten(0, 1).transpose(1, 2)).reshape(groups, b - a, tasks, tasks).sum(0))
        if against is None:
            for n in range(b - a):  # in place, one example at a time: no piece-sized temporary
                total += J[:, n]
        else:
            contribution.append(contributions(J, against))
        if keep:
            kept.append(J)
    if against is None:
        contribution = [contributions(J, total) for J in (kept if keep else (piece(a, b) for a, b in pieces))]
    else:
        total = against
    gram = gram_of(total.transpose(0, 1).reshape(tasks, -1))
    return LayerAttribution(gram, torch.cat(contribution), torch.cat(within), "per-example")


@dataclass
class LayerGram:
    """What a rule returns: the T x T Gram of one module's parameters and the route that produced it."""

    gram: Tensor
    route: str


def register_rule(*module_types: type[nn.Module] | str) -> Callable[[R], R]:
    """Class decorator: use this rule for modules of these types (and their subclasses).

    A type may also be named by its import path (``"package.module.Class"``), so that a rule for a class of an
    optional library is registered without importing that library.

    >>> import torch.nn as nn
    >>> @register_rule(nn.PReLU)
    ... class PReLURule(LayerRule):
    ...     param_names = ("weight",)
    >>> type(rule_for(nn.PReLU())).__name__
    'PReLURule'
    >>> _ = _REGISTRY.pop(nn.PReLU)
    """

    def decorate(cls: R) -> R:
        rule = cls()
        for t in module_types:
            _REGISTRY[t] = rule
        return cls

    return decorate


def rule_for(module: nn.Module) -> LayerRule[Any] | None:
    """The rule registered for ``module``'s type (nearest in its class hierarchy), or ``None``.

    A subclass that overrides ``forward`` computes something else than the registered type does, so it gets no
    rule (its parameters take the exact generic route).
    """
    for cls in type(module).__mro__:
        rule = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            same_forward = type(module).forward is getattr(cls, "forward", None)
            return rule if same_forward and rule.accepts(module) else None
    return None


#: Length of the slices whose partial inner products are summed in float64 (see :func:`gram_of`); products up to
#: four slices long are taken in one piece (their float32 error stays near 1e-7 relative).
CHUNK = 16384


def gram_of(rows: Tensor, other: Tensor | None = None) -> Tensor:
    """``rows @ other.T`` for per-task rows ``[T, k]`` (``other`` defaults to ``rows``), in ``rows``' dtype.

    Long float32 inner products lose digits as they grow, so the rows are cut into slices of :data:`CHUNK`
    entries, each slice's products are taken in the rows' dtype and the partial results are summed in float64:
    the error stays that of a short product whatever ``k`` is.

    >>> a = torch.randn(3, 100_000)
    >>> torch.allclose(gram_of(a).double(), a.double() @ a.double().T, rtol=1e-6, atol=1e-3)
    True
    """
    other = rows if other is None else other
    T, k = rows.shape
    if rows.dtype == torch.float64 or k <= 4 * CHUNK:
        return rows @ other.T
    whole = k - k % CHUNK
    partial = torch.bmm(
        rows[:, :whole].reshape(T, -1, CHUNK).transpose(0, 1),
        other[:, :whole].reshape(other.shape[0], -1, CHUNK).permute(1, 2, 0),
    )  # [k // CHUNK, T, T']
    total = partial.double().sum(0)
    if whole < k:
        total += (rows[:, whole:] @ other[:, whole:].T).double()
    return total.to(rows.dtype)


def task_rows(per_task: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """Per-task gradients ``{name: [T, *shape]}`` as one ``[T, P]`` block, names in sorted order.

    >>> task_rows({"b": torch.ones(2, 1), "a": torch.zeros(2, 2)}, torch.float32).tolist()
    [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    """
    return torch.cat([per_task[n].to(dtype).flatten(1) for n in sorted(per_task)], dim=1)


def task_blocks(rows: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`task_rows`: a ``[T, P]`` block cut back into ``{name: [T, *shape]}``, with the names and
    shapes of ``like`` (views of ``rows``).

    >>> like = {"b": torch.zeros(2, 1), "a": torch.zeros(2, 2)}
    >>> {n: t.tolist() for n, t in task_blocks(torch.arange(6.0).reshape(2, 3), like).items()}
    {'a': [[0.0, 1.0], [3.0, 4.0]], 'b': [[2.0], [5.0]]}
    """
    names = sorted(like)
    parts = rows.split([like[n][0].numel() for n in names], dim=1)
    return {n: part.reshape(like[n].shape) for n, part in zip(names, parts)}


def materialised_gram(per_task: dict[str, Tensor], gram_dtype: torch.dtype) -> LayerGram:
    """The Gram of a module's materialised per-task gradients ``{name: [T, *shape]}``, taken in ``gram_dtype``.

    >>> g = materialised_gram({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, torch.float64)
    >>> g.gram.tolist(), g.route
    ([[5.0, 11.0], [11.0, 25.0]], 'materialised')
    """
    return LayerGram(gram_of(task_rows(per_task, gram_dtype)), "materialised")
