"""Which parameters are shared (the ones measured), and which layer each belongs to.

The shared parameters are given (a module, or a list of parameters) or discovered: at a step that carries two or
more tasks, the parameters that receive gradient from at least two of them. They are read from the autograd
graph; through a ``torch.compile``'d region, whose graph hides which task uses what, from the gradients' being
non-zero. A step with a single task never fixes them (every parameter it reaches would look shared). When the set
of parameters that require grad changes (some unfrozen, frozen, added or removed mid-run, such as a LoRA adapter
put in by the split toolkit), the next step with two or more tasks discovers again: what it finds is added,
parameters no longer in the model are dropped, and frozen parameters are left out of every step. A model whose
trainable parameters no two tasks share while others are frozen (a heads-only warm-up) has no shared parameter
for now, and is not an error.

A layer is the module that owns a parameter, named by its qualified name; the model's own parameters form the
layer :data:`ROOT_LAYER`. The layers go bottom to top in the order of ``model.named_modules()``
(:func:`layer_ranks`): the order of every report's layers.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
>>> layer_of, _ = layer_names(model)
>>> sorted(set(layer_of.values()))
['0', '2']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradconflict.measure.checkpoint import segment_leaves
from gradconflict.measure.fsdp import unsharded_copies
from gradconflict.measure.graph import depends_on, leaves_of, walk_graph

__all__ = ["ROOT_LAYER", "SharedParameters", "gram_dtype", "layer_names", "layer_ranks"]

#: The layer name of parameters that belong to the model itself (not to a submodule).
ROOT_LAYER = "(root)"


def layer_names(model: nn.Module) -> tuple[dict[int, str], dict[nn.Module, str]]:
    """``(parameter id -> layer name, module -> layer name)`` for every module and parameter of ``model``."""
    module_name = {m: n or ROOT_LAYER for n, m in model.named_modules()}
    layer_of: dict[int, str] = {}
    for module, name in module_name.items():
        for p in module.parameters(recurse=False):
            layer_of.setdefault(id(p), name)
    return layer_of, module_name


def layer_ranks(module_name: Mapping[nn.Module, str]) -> dict[str, int]:
    """Each layer's position from the bottom of the network, given :func:`layer_names`' second mapping: the order of
    ``model.named_modules()`` (the model's own parameters, :data:`ROOT_LAYER`, first; a module met twice counts where
    it is met first).

    >>> from collections import OrderedDict
    >>> model = nn.Sequential(OrderedDict(z_in=nn.Linear(2, 2), a_out=nn.Linear(2, 1)))
    >>> layer_ranks(layer_names(model)[1])
    {'(root)': 0, 'z_in': 1, 'a_out': 2}
    """
    return {name: k for k, name in enumerate(dict.fromkeys(module_name.values()))}


class SharedParameters:
    """The shared parameters of ``model``: given by ``shared`` (a module or parameters), or discovered.

    Args:
        model: the model.
        shared: a submodule (its parameters that require grad, read at each step), an iterable of parameters of
            the model, or ``None`` to discover them.
    """

    def __init__(self, model: nn.Module, shared: nn.Module | Iterable[nn.Parameter] | None) -> None:
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.module: nn.Module | None = None
        self._found: dict[int, nn.Parameter] = {}
        self._known: set[int] | None = None  # parameters that required grad at the last discovery (None: none yet)
        self._verified: set[str] = set()  # tasks whose loss was seen to reach the shared parameters
        self._copies: dict[int, tuple[nn.Parameter, Tensor]] = {}  # FSDP2: unsharded copy -> its parameter
        self.discover = shared is None
        if isinstance(shared, nn.Module):
            if not any(m is shared for m in model.modules()):
                raise ValueError("shared= must be a submodule of the model (or parameters of the model)")
            self.module = shared
        elif shared is not None:
            params = list(shared)
            for p in params:
                if not isinstance(p, Tensor) or id(p) not in self.names:
                    raise ValueError(
                        "shared= must be a submodule of the model or parameters of the model; got a "
                        f"{type(p).__name__} that is not among model.named_parameters()"
                    )
            if not any(p.requires_grad for p in params):
                raise ValueError("shared= holds no parameter that requires grad: nothing to measure")
            self._found = {id(p): p for p in params}

    def expand(self, node: Any) -> Sequence[Tensor]:
        """The parameters inside a reentrant checkpoint node (see
        :func:`~gradconflict.measure.checkpoint.segment_leaves`)."""
        return segment_leaves(node, self.model)

    def canonical(self, t: Tensor) -> Tensor:
        """The parameter a graph leaf stands for (itself, or the sharded parameter of an FSDP2 unsharded copy)."""
        entry = self._copies.get(id(t))
        return t if entry is None else entry[0]

    def _parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """``module``'s parameters that require grad, each once, by their canonical (sharded) identity."""
        found = {id(q): q for q in (self.canonical(p) for p in module.parameters()) if q.requires_grad}
        return list(found.values())  # type: ignore[arg-type]

    def leaves(self, shared: Sequence[nn.Parameter]) -> dict[int, Tensor]:
        """``id(parameter) -> the tensor the autograd graph holds for it``, where that is another tensor (FSDP2)."""
        wanted = {id(p) for p in shared}
        return {id(p): copy for p, copy in self._copies.values() if id(p) in wanted}

    def resolve(self, names: Sequence[str], losses: Sequence[Tensor]) -> list[nn.Parameter] | None:
        """This step's shared parameters that require grad; ``None`` while discovery waits for a step with two
        or more tasks. Raises ``ValueError`` when no parameter is shared by two tasks."""
        self._copies = unsharded_copies(self.model)
        if self.module is not None:
            found = self._parameters(self.module)
            self._name(found)
            return found
        if self.discover:
            trainable = {id(p) for p in self._parameters(self.model)}
            if trainable != self._known:
                if len(losses) < 2:
                    return None if self._known is None else self._current()
                self._discover(names, losses, trainable)
        return self._current()

    def _name(self, params: Sequence[Tensor]) -> None:
        """Name the model's parameters again when some are new (added mid-run)."""
        if any(id(p) not in self.names for p in params):
            self.names = {id(p): n for n, p in self.model.named_parameters()}

    def _current(self) -> list[nn.Parameter]:
        return [p for p in self._found.values() if p.requires_grad]

    def _discover(self, names: Sequence[str], losses: Sequence[Tensor], trainable: set[int]) -> None:
        if walk_graph(list(losses)).opaque:
            reached = self._reached_numerically(losses)
        else:
            reached = [{id(self.canonical(t)) for t in leaves_of(loss, self.expand)} for loss in losses]
        params = self._parameters(self.model)
        self._name(params)
        found = [p for p in params if sum(id(p) in r for r in reached) >= 2]
        frozen = any(not p.requires_grad for p in self.model.parameters())
        if not found and not self._found and not frozen:
            raise ValueError(
                f"no parameter of the model receives gradient from two or more of the tasks {list(names)}: there "
                "is no shared backbone to measure. Check that the losses come from this model, or pass shared=..."
            )
        present = {id(p) for p in self.model.parameters()}
        self._found = {k: p for k, p in self._found.items() if k in present}
        self._found.update((id(p), p) for p in found)
        self._known = trainable

    def _reached_numerically(self, losses: Sequence[Tensor]) -> list[set[int]]:
        """Which parameters each loss moves, by its gradient: a compiled region's backward lists every parameter
        it holds as an input, whichever task uses it, so its graph cannot tell."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        reached = []
        for loss in losses:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            reached.append({id(p) for p, g in zip(params, grads) if g is not None and bool(g.any())})
        return reached

    def check_dependence(self, names: Sequence[str], losses: Sequence[Tensor], shared: list[nn.Parameter]) -> None:
        """Raise ``ValueError`` naming a task whose loss depends on no shared parameter. Each task is checked
        once, at its first step: a graph walk per task and step would cost more than the rest of the book-keeping."""
        for name, loss in zip(names, losses):
            if name in self._verified:
                continue
            if self.reaches(loss, shared):
                self._verified.add(name)
            else:
                raise ValueError(
                    f"loss {name!r} does not depend on any shared parameter; every task must use the shared "
                    f"backbone ({len(shared)} parameters, e.g. {[self.names.get(id(p), '?') for p in shared[:3]]})"
                )

    def reaches(self, loss: Tensor, shared: list[nn.Parameter]) -> bool:
        """Whether ``loss``'s graph reaches any of the ``shared`` parameters (a graph walk)."""
        return depends_on(loss, [*shared, *self.leaves(shared).values()], self.expand)

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> list[str]:
        """The names of the shared parameters: the discovered or given ones (what a resumed run restores), or the
        shared module's that require grad."""
        if self.module is not None:
            params = self._parameters(self.module)
            self._name(params)
            return [self.names[id(p)] for p in params]
        return [self.names[k] for k in self._found if k in self.names]

    def load(self, names: Sequence[str]) -> None:
        """Restore :meth:`state`; a name the model lacks raises ``ValueError``."""
        params = dict(self.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"the saved shared parameters {missing[:5]} are not parameters of this model")
        if self.module is None:
            self._found = {id(params[n]): params[n] for n in names}
            self._known = {id(p) for p in self._parameters(self.model)}


def gram_dtype(shared: Sequence[nn.Parameter]) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (also under reduced-precision autocast)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in shared) else torch.float32

