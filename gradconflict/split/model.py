"""The multi-task model convention that the split tools work on, and :class:`MultiTaskNet`, which implements it.

A multi-task model has a ``.backbone`` (an ``nn.Sequential`` or ``nn.ModuleList`` of blocks, or any module whose
blocks the caller names by path) and ``.heads`` (an ``nn.ModuleDict`` task -> head); its ``forward(x)`` returns
``{task: output}``.

>>> import torch, torch.nn as nn
>>> net = MultiTaskNet(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), {"a": nn.Linear(8, 1), "b": nn.Linear(8, 3)})
>>> {t: tuple(y.shape) for t, y in net(torch.randn(2, 4)).items()}
{'a': (2, 1), 'b': (2, 3)}
>>> [path for path, _ in backbone_blocks(net)]
['backbone.0', 'backbone.1']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import nn

__all__ = ["MultiTaskNet", "backbone_blocks", "check_convention", "count_parameters", "run_backbone"]

_HOW = (
    "the split tools expect a model with `.backbone` (an nn.Sequential or nn.ModuleList of blocks, or any module "
    "plus `blocks=[...]` naming its block paths) and `.heads` (an nn.ModuleDict task -> head) whose forward(x) "
    "returns {task: output}; wrap your parts with gradconflict.MultiTaskNet(backbone, heads)"
)


def check_convention(model: nn.Module) -> tuple[nn.Module, nn.ModuleDict]:
    """Return ``(model.backbone, model.heads)``, or raise a ``TypeError`` naming what is missing.

    >>> import torch.nn as nn
    >>> check_convention(nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    TypeError: Linear has no `.backbone`: the split tools expect ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    for attr in ("backbone", "heads"):
        if not isinstance(getattr(model, attr, None), nn.Module):
            raise TypeError(f"{name} has no `.{attr}`: {_HOW}")
    heads = model.heads
    if not isinstance(heads, nn.ModuleDict) or len(heads) == 0:
        raise TypeError(f"{name}.heads is a {type(heads).__name__}, not a non-empty nn.ModuleDict: {_HOW}")
    return cast(nn.Module, model.backbone), heads


def backbone_blocks(model: nn.Module, blocks: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks in execution order, as ``(path in model, module)`` pairs.

    Args:
        model: a model following the convention.
        blocks: paths of the blocks in ``model`` (e.g. ``["backbone.stem", "backbone.layer1"]``). Without them the
            blocks are the children of an ``nn.Sequential`` or ``nn.ModuleList`` backbone; for any other backbone,
            its stack of layers (the ``nn.ModuleList`` holding the most parameters: a transformer's encoder
            layers) with each of its layers a block, and the modules before and after it (embeddings, final norm,
            pooler) blocks of their own, in the order they were registered.

    >>> import torch.nn as nn
    >>> net = MultiTaskNet(nn.ModuleList([nn.Linear(2, 2)]), {"a": nn.Linear(2, 1)})
    >>> backbone_blocks(net, ["backbone.0"])[0][0]
    'backbone.0'
    >>> class Encoder(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Embedding(5, 4)
    ...         self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    ...         self.norm = nn.LayerNorm(4)
    >>> [path for path, _ in backbone_blocks(MultiTaskNet(Encoder(), {"a": nn.Identity()}))]
    ['backbone.embed', 'backbone.layers.0', 'backbone.layers.1', 'backbone.norm']
    """
    backbone, _ = check_convention(model)
    if blocks is not None:
        if len(blocks) == 0:
            raise ValueError("blocks= is empty: name at least one block path, e.g. ['backbone.0']")
        out = []
        for path in blocks:
            try:
                out.append((path, model.get_submodule(path)))
            except AttributeError as err:
                raise ValueError(f"block path {path!r} is not a submodule of {type(model).__name__}") from err
        return out
    if isinstance(backbone, (nn.Sequential, nn.ModuleList)):
        return [(f"backbone.{name}", module) for name, module in backbone.named_children()]
    stack = _layer_stack(backbone)
    if stack is None:
        raise TypeError(
            f"{type(model).__name__}.backbone is a {type(backbone).__name__} with no stack of layers (nn.ModuleList): "
            "pass blocks=[...] with the paths of its blocks in execution order (e.g. ['backbone.stem', "
            "'backbone.layer1', ...])"
        )
    return _around(backbone, "backbone", stack)


def _layer_stack(backbone: nn.Module) -> str | None:
    """Path (in ``backbone``) of its ``nn.ModuleList`` holding the most parameters, or ``None``."""
    stacks = [(sum(p.numel() for p in m.parameters()), name) for name, m in backbone.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(stacks, key=lambda s: s[0])[1] if stacks else None


def _around(module: nn.Module, prefix: str, stack: str) -> list[tuple[str, nn.Module]]:
    """``module``'s children as blocks, the one that leads to ``stack`` opened up, down to its layers."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if name == stack:
            out.extend((f"{path}.{i}", layer) for i, layer in child.named_children())
        elif stack.startswith(name + "."):
            out.extend(_around(child, path, stack[len(name) + 1:]))
        else:
            out.append((path, child))
    return out


def run_backbone(backbone: nn.Module, x: Any) -> Any:
    """Apply a backbone: call it, or apply each block in turn when it is an ``nn.ModuleList``.

    >>> import torch, torch.nn as nn
    >>> run_backbone(nn.ModuleList([nn.Identity(), nn.Identity()]), torch.ones(1)).tolist()
    [1.0]
    """
    if isinstance(backbone, nn.ModuleList):
        for block in backbone:
            x = block(x)
        return x
    return backbone(x)


def count_parameters(model: nn.Module, tasks: Sequence[str] | None = None) -> int:
    """Number of distinct parameter entries of ``model``; with ``tasks``, heads of other tasks are left out.

    >>> import torch.nn as nn
    >>> net = MultiTaskNet(nn.Linear(2, 2), {"a": nn.Linear(2, 1), "b": nn.Linear(2, 5)})
    >>> count_parameters(net), count_parameters(net, ["a"])
    (24, 9)
    """
    skip: set[int] = set()
    heads = getattr(model, "heads", None)
    if tasks is not None and isinstance(heads, nn.ModuleDict):
        skip = {id(p) for t, head in heads.items() if t not in tasks for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


class MultiTaskNet(nn.Module):
    """A shared backbone followed by one head per task; ``forward(x)`` returns ``{task: head(backbone(x))}``.

    Args:
        backbone: the shared part: an ``nn.Sequential``, an ``nn.ModuleList`` of blocks (applied in turn), or any
            module.
        heads: task name -> head module.

    >>> import torch, torch.nn as nn
    >>> net = MultiTaskNet(nn.ModuleList([nn.Linear(3, 3)]), {"a": nn.Identity()})
    >>> net(torch.zeros(1, 3))["a"].shape
    torch.Size([1, 3])
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("MultiTaskNet needs at least one head")
        self.backbone = backbone
        self.heads = heads if isinstance(heads, nn.ModuleDict) else nn.ModuleDict(dict(heads))

    def forward(self, x: Any) -> dict[str, Any]:
        """``{task: output}``: the backbone once, then every head on its features."""
        features = run_backbone(self.backbone, x)  # computed once, read by every head
        return {task: head(features) for task, head in self.heads.items()}
