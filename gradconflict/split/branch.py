"""Step 3, the physical split: give each task group its own copy of the backbone from a chosen block up.

>>> import torch, torch.nn as nn
>>> from gradconflict.split import MultiTaskNet
>>> net = MultiTaskNet(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)),
...                    {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1), "c": nn.Linear(8, 1)})
>>> split = branch(net, at=2, groups=[["a", "b"], ["c"]])
>>> x = torch.randn(5, 4)
>>> all(torch.equal(split(x)[t], net(x)[t]) for t in "abc")   # same function at the moment of the split
True
>>> list(split.branches)
['a+b', 'c']
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradconflict.split.model import backbone_blocks, check_convention

__all__ = ["BranchedNet", "branch"]


class BranchedNet(nn.Module):
    """A backbone that forks: the shared ``stem`` runs once, then each task group's branch feeds its heads.

    Built by :func:`branch`. ``forward(x)`` returns ``{task: output}`` like the model it came from.

    Attributes:
        stem: the shared blocks below the branch point (an ``nn.Sequential``; empty for a full split).
        branches: group name (its tasks joined by ``+``) -> that group's copy of the blocks from the branch point up.
        heads: task -> head, as in the original model.
        groups: group name -> its tasks.
        block_paths: the original paths of the blocks, in order (stem first).

    >>> import torch.nn as nn
    >>> net = BranchedNet(nn.Sequential(), {"a": nn.Sequential(nn.Identity())}, {"a": nn.Identity()}, {"a": ["a"]})
    >>> net.groups
    {'a': ['a']}
    """

    def __init__(
        self,
        stem: nn.Sequential,
        branches: dict[str, nn.Sequential],
        heads: nn.ModuleDict | dict[str, nn.Module],
        groups: dict[str, list[str]],
        block_paths: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.stem = stem
        self.branches = nn.ModuleDict(branches)
        self.heads = heads if isinstance(heads, nn.ModuleDict) else nn.ModuleDict(heads)
        self.groups = {name: list(tasks) for name, tasks in groups.items()}
        self.block_paths = list(block_paths)

    def forward(self, x: Any) -> dict[str, Any]:
        """Every task's output: the shared stem once, then each group's own copy of the upper blocks."""
        shared = self.stem(x)  # the prefix is computed once for all groups
        out: dict[str, Any] = {}
        for name, tasks in self.groups.items():
            features = self.branches[name](shared)
            out.update({t: self.heads[t](features) for t in tasks})
        return {t: out[t] for t in self.heads if t in out}  # the heads' order, like the original model


def _resolve_at(at: int | str, paths: list[str]) -> int:
    """Index of the first branched block: an int, or the path of a block or of a module inside one."""
    if isinstance(at, int) and not isinstance(at, bool):
        if not 0 <= at <= len(paths):
            raise ValueError(f"at={at} is outside the backbone's {len(paths)} blocks (0 .. {len(paths)})")
        return at
    if isinstance(at, str):
        for i, path in enumerate(paths):
            if at == path or at.startswith(path + ".") or at == path.split(".", 1)[-1]:
                return i
        raise ValueError(f"at={at!r} names no backbone block; the blocks are {paths}")
    raise TypeError(f"at must be a block index or a block path, got {type(at).__name__}")


def branch(
    model: nn.Module,
    at: int | str,
    groups: Sequence[Sequence[str]] | None = None,
    *,
    blocks: Sequence[str] | None = None,
    example_input: Any = None,
) -> BranchedNet:
    """Split ``model``'s backbone at block ``at``: shared below, one deep copy per task group from ``at`` up.

    Weights are copied, so training resumes where it was: at the moment of the split the result computes
    exactly what ``model`` computes. ``model`` itself is left untouched (the result holds copies of every part).

    Args:
        model: a model following the convention (``.backbone`` and ``.heads``; see :class:`MultiTaskNet`).
        at: the first block that is no longer shared: an index into the blocks (0 = copy the whole backbone per
            group), a block path such as ``"backbone.3"``, or the path of a module inside a block.
        groups: task groups, each a list of task names; together they must cover every head exactly once.
            ``None`` gives every task its own branch (``[[t] for t in tasks]``); with ``at=0`` that is the full
            split, one backbone per task.
        blocks: block paths in execution order, for a backbone that is not an ``nn.Sequential`` or
            ``nn.ModuleList``; applied in turn they must compute the backbone's output.
        example_input: if given, check on it that the result reproduces ``model``'s outputs (catches block lists
            that miss a step of the backbone's forward).

    >>> import torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> net = MultiTaskNet(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]), {"a": nn.Identity(), "b": nn.Identity()})
    >>> full = branch(net, at=0)
    >>> len(full.stem), sorted(full.branches)
    (0, ['a', 'b'])
    """
    _, heads = check_convention(model)
    tasks = list(heads)
    groups = [[t] for t in tasks] if groups is None else [list(g) for g in groups]
    flat = [t for g in groups for t in g]
    if any(len(g) == 0 for g in groups) or sorted(flat) != sorted(tasks):
        raise ValueError(f"groups={groups} must split the tasks {tasks} into non-empty groups, each task once")
    found = backbone_blocks(model, blocks)
    paths, modules = [p for p, _ in found], [m for _, m in found]
    index = _resolve_at(at, paths)

    # copies only, so the original stays as it was; stem and heads in one deepcopy keep any weight they tie
    stem, head_copies = copy.deepcopy((modules[:index], heads))
    branches = {"+".join(g): nn.Sequential(*copy.deepcopy(modules[index:])) for g in groups}
    result = BranchedNet(nn.Sequential(*stem), branches, head_copies, {"+".join(g): g for g in groups}, paths)
    if example_input is not None:
        _check_same(model, result, example_input)
    return result


def _check_same(model: nn.Module, result: BranchedNet, x: Any) -> None:
    with torch.no_grad():
        expected, got = model(x), result(x)
    for task, value in expected.items():
        if not torch.allclose(got[task], value, rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"the branched model's output for task {task!r} differs from the original's: the blocks "
                f"{result.block_paths}, applied in turn, do not compute the backbone's forward; name every step "
                "of the backbone in blocks= (wrap functional steps such as flatten in modules)"
            )
