"""Step 3, the physical split: give each task group its own copy of the backbone from a chosen block up.

Each group gets a copy of the whole model whose blocks below the branch point are the *same* modules for every
group (the shared stem) and whose blocks from the branch point up are its own. A forward runs the model's own
``forward`` once per group, so whatever the backbone's forward does between its blocks (masks, position ids,
blocks that take keyword arguments or return tuples, as a transformer's encoder layers do) is done as in the
original; the shared blocks compute in the first group's pass only and hand the same outputs to the other
groups, so the stem costs one pass and receives the gradient of every group.

>>> import torch, torch.nn as nn
>>> from gradconflict.split import MultiTaskNet
>>> net = MultiTaskNet(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)),
...                    {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1), "c": nn.Linear(8, 1)})
>>> split = branch(net, at=2, groups=[["a", "b"], ["c"]])
>>> x = torch.randn(5, 4)
>>> all(torch.equal(split(x)[t], net(x)[t]) for t in "abc")   # same function at the moment of the split
True
>>> list(split.branches), len(split.stem)
(['a+b', 'c'], 2)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from gradconflict.split.model import backbone_blocks, check_convention

__all__ = ["BranchedNet", "SharedBlock", "branch", "duplicated_share"]


class _Fork:
    """What the shared blocks of one :class:`BranchedNet` forward share: the first group's pass records each
    shared block's outputs, the other groups' passes replay them."""

    def __init__(self) -> None:
        self.group: str | None = None
        self.recording = False
        self.outputs: dict[int, list[Any]] = {}
        self.calls: dict[int, int] = {}
        self.branched: str | None = None  # the first block above the branch point entered in the recording pass

    def start(self, group: str, recording: bool) -> None:
        self.group, self.recording, self.calls = group, recording, {}
        if recording:
            self.outputs, self.branched = {}, None

    def stop(self) -> None:
        self.group, self.outputs, self.calls = None, {}, {}

    def entered(self, path: str, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the blocks above the branch point."""
        if self.recording and self.branched is None:
            self.branched = path

    def call(self, shared: SharedBlock, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.group is None:  # called outside a BranchedNet forward: a plain block
            return shared.block(*args, **kwargs)
        key = id(shared)
        if self.recording:
            if self.branched is not None:
                raise ValueError(
                    f"the shared block {shared.path!r} runs after {self.branched!r}, a block above the branch point: "
                    "the blocks are not in execution order; pass blocks=[...] in the order the backbone's forward "
                    "runs them"
                )
            output = shared.block(*args, **kwargs)
            self.outputs.setdefault(key, []).append(output)
            return output
        done, recorded = self.calls.get(key, 0), self.outputs.get(key, [])
        if done >= len(recorded):
            raise ValueError(
                f"group {self.group!r} calls the shared block {shared.path!r} more often than the first group: the "
                "model's forward must run the blocks below the branch point the same way for every group"
            )
        self.calls[key] = done + 1
        return recorded[done]


class SharedBlock(nn.Module):
    """A block below the branch point, as every group's copy of the model holds it (one object for all groups).

    Inside a :class:`BranchedNet` forward it computes in the first group's pass and returns the same outputs to
    the others; called on its own, it is the block. Attributes it does not have are read from the block, so code
    that inspects its layers (``layer.attention_type``) still works.

    Attributes:
        block: the wrapped module.
        path: its path in the original model.
    """

    def __init__(self, block: nn.Module, path: str, fork: _Fork) -> None:
        super().__init__()
        self.block = block
        self.path = path
        self._fork = fork

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The block's output: computed once per :class:`BranchedNet` forward, shared by every group."""
        return self._fork.call(self, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "block" not in modules or name.startswith("__"):
                raise
            return getattr(modules["block"], name)


class BranchedNet(nn.Module):
    """A backbone that forks: the shared stem runs once, then each task group's copy of the model feeds its heads.

    Built by :func:`branch`. ``forward(*args, **kwargs)`` takes what the original model takes and returns
    ``{task: output}`` like it.

    Attributes:
        stem: the shared blocks below the branch point (an ``nn.ModuleList``; empty for a full split).
        branches: group name (its tasks joined by ``+``) -> that group's copy of the model: the shared blocks
            (the modules of ``stem``), its own copies of the blocks from the branch point up, and the heads. Each
            group's pass also evaluates the other groups' heads, whose outputs it drops.
        heads: task -> head, one each, used by every group's copy.
        groups: group name -> its tasks.
        block_paths: the original paths of the blocks, in order (stem first).

    >>> import torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> net = branch(MultiTaskNet(nn.Linear(2, 2), {"a": nn.Identity()}), at=0, blocks=["backbone"])
    >>> net.groups, len(net.stem)
    ({'a': ['a']}, 0)
    """

    def __init__(
        self,
        stem: nn.ModuleList,
        branches: dict[str, nn.Module],
        heads: nn.ModuleDict,
        groups: dict[str, list[str]],
        block_paths: Sequence[str],
        fork: _Fork,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.branches = nn.ModuleDict(branches)
        self.heads = heads
        self.groups = {name: list(tasks) for name, tasks in groups.items()}
        self.block_paths = list(block_paths)
        self._fork = fork

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Every task's output: each group's copy of the model in turn, the shared stem computed in the first."""
        out: dict[str, Any] = {}
        try:
            for i, (name, tasks) in enumerate(self.groups.items()):
                self._fork.start(name, recording=i == 0)
                result = self.branches[name](*args, **kwargs)
                out.update({t: result[t] for t in tasks})
        finally:
            self._fork.stop()  # the recorded outputs are released with the forward
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


def duplicated_share(model: nn.Module, at: int | str, *, blocks: Sequence[str] | None = None) -> float:
    """The share of the backbone's parameters that :func:`branch` ``(model, at=at, blocks=blocks)`` copies: what
    each group beyond the first adds, as a share of the backbone (0: nothing copied; 1: the whole backbone).

    It is what ``branch`` does, counted: every distinct backbone parameter outside the shared blocks below ``at``
    (the blocks from ``at`` up, and any module no block names) is copied once per extra group, so a branched
    model with ``g`` groups holds ``(g - 1) * share * backbone parameters`` more than ``model``. ``at`` is read as
    ``branch`` reads it: a layer's path branches at its block, so the whole block counts.

    >>> import torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> net = MultiTaskNet(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), {"a": nn.Linear(4, 1)})
    >>> duplicated_share(net, at=1), duplicated_share(net, at="backbone.0.weight"), duplicated_share(net, at=2)
    (0.5, 1.0, 0.0)
    """
    backbone, _ = check_convention(model)
    paths = [p for p, _ in backbone_blocks(model, blocks)]
    index = _resolve_at(at, paths)
    shared = {id(p) for path in paths[:index] for p in model.get_submodule(path).parameters()}
    params = {id(p): p.numel() for p in backbone.parameters()}  # distinct parameters: tied ones count once
    total = sum(params.values())
    if not total:
        raise ValueError("the backbone has no parameters: there is nothing to share or copy")
    return sum(n for key, n in params.items() if key not in shared) / total


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
        model: a model following the convention (``.backbone`` and ``.heads``; see :class:`MultiTaskNet`). Its own
            ``forward`` runs for each group, with whatever arguments the result is called with (masks included).
        at: the first block that is no longer shared: an index into the blocks (0 = copy the whole backbone per
            group), a block path such as ``"backbone.3"`` or ``"backbone.encoder.layer.2"``, or the path of a
            module inside a block (a layer name from the diagnosis, such as
            ``"backbone.embeddings.word_embeddings"``, branches at its block).
        groups: task groups, each a list of task names; together they must cover every head exactly once.
            ``None`` gives every task its own branch (``[[t] for t in tasks]``); with ``at=0`` that is the full
            split, one backbone per task.
        blocks: block paths in execution order, for a backbone whose blocks :func:`backbone_blocks` does not find
            by itself (an ``nn.Sequential``, an ``nn.ModuleList`` or a backbone with a stack of layers, such as
            a Hugging Face encoder or decoder, need none). Modules that no block names are copied per group.
        example_input: if given, run the result on it once and check that it reproduces ``model``'s outputs
            (in eval mode; modes are restored); a block list out of execution order is reported here.

    >>> import torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> net = MultiTaskNet(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]), {"a": nn.Identity(), "b": nn.Identity()})
    >>> full = branch(net, at=0)
    >>> len(full.stem), sorted(full.branches)
    (0, ['a', 'b'])
    """
    _, heads = check_convention(model)
    tasks = list(heads)
    task_groups = [[t] for t in tasks] if groups is None else [list(g) for g in groups]
    flat = [t for g in task_groups for t in g]
    if any(len(g) == 0 for g in task_groups) or sorted(flat) != sorted(tasks):
        raise ValueError(f"groups={groups} must split the tasks {tasks} into non-empty groups, each task once")
    paths = [p for p, _ in backbone_blocks(model, blocks)]
    index = _resolve_at(at, paths)

    template = copy.deepcopy(model)  # copies only: the original stays as it was
    fork = _Fork()
    stem = [SharedBlock(template.get_submodule(path), path, fork) for path in paths[:index]]
    for shared in stem:
        _replace(template, shared.path, shared)
    # objects every group's copy holds as they are: the shared blocks (with their weights) and the heads
    template_heads = cast(nn.ModuleDict, template.heads)
    keep: list[nn.Module] = [*stem, template_heads]
    keep_ids: dict[int, Any] = {id(x): x for obj in keep for x in (*obj.modules(), *obj.parameters(), *obj.buffers())}
    keep_ids[id(fork)] = fork
    names = ["+".join(g) for g in task_groups]
    copies = {name: template if i == 0 else copy.deepcopy(template, dict(keep_ids)) for i, name in enumerate(names)}
    for group_model in copies.values():
        for path in paths[index:]:
            group_model.get_submodule(path).register_forward_pre_hook(functools.partial(fork.entered, path))
    result = BranchedNet(
        nn.ModuleList([s.block for s in stem]), copies, template_heads, dict(zip(names, task_groups)), paths, fork
    )
    if example_input is not None:
        _check_same(model, result, example_input)
    return result


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _check_same(model: nn.Module, result: BranchedNet, x: Any) -> None:
    modes = [(m, m.training) for m in (*model.modules(), *result.modules())]
    model.eval()
    result.eval()
    try:
        with torch.no_grad():
            expected, got = model(x), result(x)
    finally:
        for module, training in modes:
            module.training = training
    for task, value in expected.items():
        if not torch.allclose(got[task], value, rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"the branched model's output for task {task!r} differs from the original's: does the model's "
                "forward depend on something that is not a module or a buffer (a random draw, a global)?"
            )
