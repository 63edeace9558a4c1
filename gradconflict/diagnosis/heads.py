"""How heavy the task heads are, and how much each one rewrites the backbone's features.

For each head: its parameter count relative to the backbone's, its depth (number of parametrised leaf
modules), and the linear CKA (Kornblith et al., 2019) between the backbone's output (the head's input) and the
head's last hidden layer (the input of its last parametrised module) on a probe batch. CKA near 1: the head
reads the backbone's features nearly as they are; near 0: the head builds its own representation on top.

>>> import torch
>>> X = torch.randn(64, 8)
>>> round(linear_cka(X, 3 * X @ torch.linalg.qr(torch.randn(8, 8))[0]), 4)   # invariant to rotation and scale
1.0
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["HeadStats", "head_stats", "linear_cka"]


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of two representations of the same ``n`` examples (``[n, ...]``; flattened per example).

    Computed from the centred ``n x n`` Gram matrices, so the cost does not grow with the feature sizes:
    ``<K_X, K_Y>_F / (||K_X||_F ||K_Y||_F)``. 0 when either representation is constant.
    """
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same examples: got {X.shape[0]} and {Y.shape[0]} rows")
    X = X.detach().reshape(X.shape[0], -1).double()
    Y = Y.detach().reshape(Y.shape[0], -1).double()
    X, Y = X - X.mean(0), Y - Y.mean(0)
    Kx, Ky = X @ X.T, Y @ Y.T
    denom = torch.linalg.norm(Kx) * torch.linalg.norm(Ky)
    return float((Kx * Ky).sum() / denom) if denom > 0 else 0.0


@dataclass(frozen=True)
class HeadStats:
    """One head's weight and rewriting.

    Attributes:
        task: the head's task.
        num_params: parameter entries in the head.
        ratio: ``num_params`` over the backbone's parameter entries.
        depth: parametrised leaf modules in the head.
        cka: linear CKA between the backbone output and the head's last hidden layer (``None``: no probe).
    """

    task: str
    num_params: int
    ratio: float
    depth: int
    cka: float | None


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _leaves_with_params(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def head_stats(
    heads: Mapping[str, nn.Module], backbone: nn.Module, *, model: nn.Module | None = None, probe: Any = None
) -> list[HeadStats]:
    """Size, depth and (with ``model`` and ``probe``) CKA of each head.

    ``model(probe)`` is run once under ``torch.no_grad()``, in eval mode, with hooks recording each head's input
    (the backbone's features as the head receives them) and the input of the head's last parametrised module
    (its last hidden layer); the model's mode is restored afterwards.
    """
    backbone_params = sum(p.numel() for p in backbone.parameters())
    inputs: dict[str, Tensor | None] = {}
    hidden: dict[str, Tensor | None] = {}
    if model is not None and probe is not None:
        handles = []
        for task, head in heads.items():
            handles.append(
                head.register_forward_pre_hook(lambda m, args, task=task: inputs.__setitem__(task, _first_tensor(args)))
            )
            leaves = _leaves_with_params(head)
            if leaves:
                handles.append(
                    leaves[-1].register_forward_pre_hook(
                        lambda m, args, task=task: hidden.__setitem__(task, _first_tensor(args))
                    )
                )
        training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(probe)
        finally:
            model.train(training)
            for handle in handles:
                handle.remove()
    out = []
    for task, head in heads.items():
        n = sum(p.numel() for p in head.parameters())
        x, h = inputs.get(task), hidden.get(task)
        cka = linear_cka(x, h) if x is not None and h is not None else None
        out.append(HeadStats(task, n, n / backbone_params if backbone_params else float("inf"),
                             len(_leaves_with_params(head)), cka))
    return out
