"""Which models open monitors tap: a second monitor on the same modules is refused unless asked for, because
each one's backward frees the graph the other needs."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

from torch import nn

__all__ = ["attach", "unwrap"]

# Monitors alive now: token -> (the model, the ids of its modules).
_ACTIVE: dict[int, tuple[weakref.ref[nn.Module], frozenset[int]]] = {}


def unwrap(model: nn.Module) -> nn.Module:
    """The module a data-parallel or ``torch.compile`` wrapper holds (its parameter names then carry no
    ``module.`` or ``_orig_mod.`` prefix)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(compiled := getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = compiled
        else:
            return model


def attach(token: int, model: nn.Module, allow_others: bool) -> Callable[[], object]:
    """Record that monitor ``token`` taps ``model`` (the unwrapped module); returns the call that forgets it.
    Raises ``ValueError`` when another open monitor taps one of its modules and ``allow_others`` is false."""
    ids = frozenset(id(m) for m in model.modules())
    if not allow_others:
        for other, other_ids in list(_ACTIVE.values()):
            if other() is not None and ids & other_ids:
                raise ValueError(
                    "another ConflictMonitor is attached to this model: close() it first (or use `with`), or pass "
                    "allow_other_monitors=True to both measure it (each monitor's backward frees the graph)"
                )
    _ACTIVE[token] = (weakref.ref(model), ids)
    return functools.partial(_ACTIVE.pop, token, None)
