"""Step 2, the logical split: freeze the shared backbone and give each task its own low-rank adapter (LoRA).

An adapted layer computes ``base(x) + (alpha / rank) * B_t A_t x`` for the active task ``t`` (for a
convolution, ``A_t`` is a convolution with the base's kernel and ``B_t`` a 1 x 1 one). ``B_t`` starts at zero,
so a fresh split computes exactly what the model computed. The layers adapted are ``nn.Linear``, Hugging Face's
``Conv1D`` (GPT-2's linear layer, its weight stored transposed) and plain convolutions.

>>> import torch, torch.nn as nn
>>> from gradconflict.split import MultiTaskNet
>>> torch.manual_seed(0) and None
>>> net = MultiTaskNet(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
>>> split = lora_split(net, rank=2)
>>> split.layer_names
['model.backbone.0']
>>> out = split(torch.randn(3, 4))          # every task through its own adapter
>>> sorted(out), split.count_frozen()  # the backbone is frozen
(['a', 'b'], 40)
>>> with split.task("a"):                   # or route by hand
...     y = net(torch.randn(3, 4))["a"]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradconflict.split.model import check_convention

__all__ = ["LoRALayer", "LoRASplit", "adaptable", "lora_split"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D``: a linear layer whose weight is stored ``in x out``."""
    utils = sys.modules.get("transformers.pytorch_utils")  # loaded wherever such a layer exists
    return utils is not None and type(module) is getattr(utils, "Conv1D", None)


class LoRALayer(nn.Module):
    """A frozen ``nn.Linear``, Hugging Face ``Conv1D`` or ``nn.ConvNd`` plus one low-rank adapter per task; the
    active task's is applied.

    Args:
        base: the layer to adapt (its parameters are frozen).
        tasks: one adapter per task name.
        rank: the adapters' rank ``r``.
        alpha: scale numerator; the update is scaled by ``alpha / r``.

    Attributes:
        active: the task whose adapter is applied (``None``: the base layer alone).
        merged: the task whose adapter is currently added into ``base.weight`` (see :meth:`merge`).

    >>> import torch, torch.nn as nn
    >>> layer = LoRALayer(nn.Linear(3, 2), ["a"], rank=1, alpha=1.0)
    >>> tuple(layer.down["a"].shape), tuple(layer.up["a"].shape)
    ((1, 3), (2, 1))
    """

    def __init__(self, base: nn.Module, tasks: Sequence[str], rank: int, alpha: float) -> None:
        super().__init__()
        if not adaptable(base):
            raise TypeError(
                "LoRA here adapts a plain nn.Linear, Hugging Face's Conv1D, or an nn.Conv1d/2d/3d with groups=1 and "
                f"zero padding, not {base}; leave that layer out with targets="
            )
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.base = base
        self.scale = alpha / rank
        self.active: str | None = None
        self.merged: str | None = None
        self._original: Tensor | None = None
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        kernel = tuple(weight.shape[2:])  # () for Linear and Conv1D
        out_features, in_features = weight.shape[1::-1] if _transposed_linear(base) else weight.shape[:2]
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for task in tasks:
            down = torch.empty(rank, in_features, *kernel, dtype=weight.dtype, device=weight.device)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # the usual default init of a layer's weight
            self.down[task] = nn.Parameter(down)
            up = torch.zeros(out_features, rank, *(1,) * len(kernel), dtype=weight.dtype, device=weight.device)
            self.up[task] = nn.Parameter(up)  # zero: the adapter starts as a no-op

    def delta_weight(self, task: str) -> Tensor:
        """The change ``(alpha / r) B_t A_t`` that ``task``'s adapter makes to ``base.weight`` (same shape).

        >>> import torch.nn as nn
        >>> LoRALayer(nn.Conv2d(3, 4, 3), ["a"], rank=2, alpha=2.0).delta_weight("a").abs().sum().item()
        0.0
        """
        up, down = self.up[task], self.down[task]
        delta = self.scale * up.flatten(1) @ down.flatten(1)
        return delta.T if _transposed_linear(self.base) else delta.reshape(self.base.weight.shape)

    def _adapter(self, x: Tensor, task: str) -> Tensor:
        if isinstance(self.base, nn.Linear) or _transposed_linear(self.base):
            return F.linear(F.linear(x, self.down[task]), self.up[task])
        conv = _CONV[type(self.base)]
        base = self.base
        hidden = conv(x, self.down[task], None, base.stride, base.padding, base.dilation)
        return conv(hidden, self.up[task])

    def forward(self, x: Tensor) -> Tensor:
        """The base layer's output plus the active task's low-rank update (none when no task is active)."""
        y = self.base(x)
        task = self.active
        if task is None or task == self.merged:
            return y  # a merged adapter is already inside base.weight
        if self.merged is not None:
            raise RuntimeError(
                f"task {self.merged!r} is merged into the base weights; call unmerge() before routing to {task!r}"
            )
        return y + self.scale * self._adapter(x, task)

    def merge(self, task: str) -> None:
        """Add ``task``'s adapter into ``base.weight`` (the original weight is kept, for an exact unmerge)."""
        if self.merged == task:
            return
        self.unmerge()
        self._original = self.base.weight.detach().clone()
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight(task))
        self.merged = task

    def unmerge(self) -> None:
        """Restore the base weight, bit for bit, as it was before :meth:`merge`."""
        if self._original is not None:
            with torch.no_grad():
                self.base.weight.copy_(self._original)
        self._original, self.merged = None, None


class LoRASplit(nn.Module):
    """A model whose frozen backbone carries one LoRA adapter per task; built by :func:`lora_split`.

    ``split(x)`` returns ``{task: output}`` with each task's output computed under its own adapter (the backbone
    runs once per task); ``split(x, task="a")`` returns task ``a``'s output alone. To route a call of the
    wrapped model by hand, use ``with split.task("a"): model(x)``.

    Attributes:
        model: the adapted model (changed in place by :func:`lora_split`).
        tasks: the task names, one adapter each.
        layer_names: paths (in this module) of the adapted layers.

    >>> import torch, torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> split = lora_split(MultiTaskNet(nn.Linear(3, 4), {"a": nn.Linear(4, 1)}), targets=["backbone"], rank=2)
    >>> split(torch.zeros(2, 3), task="a").shape
    torch.Size([2, 1])
    """

    def __init__(self, model: nn.Module, tasks: Sequence[str], layer_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.layer_names = [f"model.{n}" for n in layer_names]
        self.train(model.training)

    def train(self, mode: bool = True) -> LoRASplit:
        """Set training mode, but keep the backbone's running-statistics layers (BatchNorm...) in eval mode.

        The backbone is frozen and shared by every task: if one task's batches moved its normalisation
        statistics, they would change the function every other task sees.
        """
        super().train(mode)
        for module in self.model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.eval()
        return self

    @property
    def layers(self) -> dict[str, LoRALayer]:
        """Path -> adapted layer."""
        return {n: self.get_submodule(n) for n in self.layer_names}

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this split has adapters for {self.tasks}")

    @contextmanager
    def task(self, task: str | None) -> Iterator[None]:
        """Route every adapted layer to ``task``'s adapter inside the ``with`` block (``None``: the base alone).

        >>> import torch.nn as nn
        >>> from gradconflict.split import MultiTaskNet
        >>> split = lora_split(MultiTaskNet(nn.Linear(2, 2), {"a": nn.Identity()}), targets=["backbone"])
        >>> with split.task("a"):
        ...     split.layers["model.backbone"].active
        'a'
        """
        if task is not None:
            self._check_task(task)
        layers = self.layers.values()
        previous = [layer.active for layer in layers]
        for layer in layers:
            layer.active = task
        try:
            yield
        finally:
            for layer, old in zip(layers, previous):
                layer.active = old

    def forward(self, *args: Any, task: str | None = None, **kwargs: Any) -> Any:
        """The model's outputs (called with the model's own arguments, masks included), each task through its own
        adapter; with ``task``, that task's alone."""
        if task is not None:
            with self.task(task):
                return self.model(*args, **kwargs)[task]
        out = {}
        for t in self.tasks:
            with self.task(t):
                out[t] = self.model(*args, **kwargs)[t]
        return out

    def adapter_parameters(self, task: str | None = None) -> list[nn.Parameter]:
        """The adapters' parameters: of one task, or of all tasks (for one optimizer over every adapter)."""
        tasks = self.tasks if task is None else [task]
        for t in tasks:
            self._check_task(t)
        return [p for layer in self.layers.values() for t in tasks for p in (layer.down[t], layer.up[t])]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that still trains: all adapters, plus the heads (unless frozen by hand)."""
        return [p for p in self.parameters() if p.requires_grad]

    def count_frozen(self) -> int:
        """Number of frozen parameter entries (the shared backbone's adapted layers, and anything frozen before)."""
        return sum(p.numel() for p in self.parameters() if not p.requires_grad)

    def adapter_state_dict(self, task: str) -> dict[str, Tensor]:
        """``task``'s adapter tensors, keyed ``<layer path>.down`` / ``<layer path>.up`` (detached copies)."""
        self._check_task(task)
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.down"] = layer.down[task].detach().clone()
            out[f"{name}.up"] = layer.up[task].detach().clone()
        return out

    def load_adapter_state_dict(self, task: str, state: Mapping[str, Tensor]) -> None:
        """Load one task's adapter from :meth:`adapter_state_dict` output."""
        self._check_task(task)
        expected = {f"{n}.{part}" for n in self.layer_names for part in ("down", "up")}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"adapter state does not match this split: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.down[task].copy_(state[f"{name}.down"])
                layer.up[task].copy_(state[f"{name}.up"])

    def merge(self, task: str) -> None:
        """Fold ``task``'s adapter into the base weights, for deployment of that task at the base's cost.

        While merged, the plain model computes ``task``'s function and routing to another task raises;
        :meth:`unmerge` restores the base weights exactly.
        """
        self._check_task(task)
        for layer in self.layers.values():
            layer.merge(task)

    def unmerge(self) -> None:
        """Undo :meth:`merge`: the base weights are restored bit for bit."""
        for layer in self.layers.values():
            layer.unmerge()


def adaptable(module: nn.Module) -> bool:
    """Whether :class:`LoRALayer` can adapt ``module``: a plain ``nn.Linear``, Hugging Face's ``Conv1D``, or an
    ``nn.ConvNd`` with ``groups=1`` and zero padding.

    Subclasses are left out on purpose: ``MultiheadAttention``'s ``out_proj`` (a ``Linear`` subclass) has its
    weight read directly by its parent, so wrapping it would break the parent.

    >>> import torch.nn as nn
    >>> adaptable(nn.Linear(2, 2)), adaptable(nn.Conv2d(4, 4, 3, groups=2)), adaptable(nn.ReLU())
    (True, False, False)
    """
    if type(module) is nn.Linear or _transposed_linear(module):
        return True
    return type(module) in _CONV and module.groups == 1 and module.padding_mode == "zeros"


def _chosen(in_backbone: list[tuple[str, nn.Module]], targets: str | Sequence[str | type] | None) -> list[str]:
    """Paths of the backbone layers that ``targets`` selects (see :func:`lora_split`)."""
    if targets is None:
        return [n for n, m in in_backbone if type(m) is nn.Linear or _transposed_linear(m)]
    if targets == "all":
        return [n for n, m in in_backbone if adaptable(m)]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if all(isinstance(t, type) for t in targets):
        return [n for n, m in in_backbone if isinstance(m, tuple(targets)) and adaptable(m)]
    chosen = [n for n, _ in in_backbone if n in targets]
    unknown = [t for t in targets if t not in chosen]
    if unknown:
        raise ValueError(f"targets {unknown} are not modules of the backbone (paths start with 'backbone')")
    return chosen


def lora_split(
    model: nn.Module,
    tasks: Sequence[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    targets: str | Sequence[str | type] | None = None,
) -> LoRASplit:
    """Freeze ``model``'s backbone and attach one LoRA adapter per task to its Linear/Conv layers, in place.

    Args:
        model: a model following the convention (``.backbone``, ``.heads``); its chosen layers are replaced by
            :class:`LoRALayer` wrappers (state-dict keys of those layers gain ``.base``).
        tasks: adapter names; default: the model's heads.
        rank: adapter rank ``r``.
        alpha: scale numerator (update scaled by ``alpha / r``); default ``r``, a scale of 1.
        targets: which layers to adapt: module paths in ``model`` (e.g. ``["backbone.0", "backbone.2"]``), a
            tuple of layer types (e.g. ``(nn.Conv2d,)``; layers of those types that LoRA cannot adapt are left out,
            see :func:`adaptable`), or ``"all"`` (every adaptable Linear and Conv layer); default: every plain
            ``nn.Linear`` (and Hugging Face ``Conv1D``) in the backbone.

    The whole backbone is frozen (also layers that get no adapter); heads keep training. Train with one optimizer
    over ``split.trainable_parameters()``; the base weights stay bit-identical.

    >>> import torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> net = MultiTaskNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), {"a": nn.LazyLinear(1)})
    >>> lora_split(net, rank=2, targets=(nn.Conv2d,)).layer_names
    ['model.backbone.0']
    """
    backbone, heads = check_convention(model)
    if any(isinstance(m, LoRALayer) for m in backbone.modules()):
        raise ValueError("the backbone already carries LoRA adapters: split the original model once, for all tasks")
    tasks = list(heads) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("lora_split needs at least one task")
    bad = [t for t in tasks if not t or "." in t]
    if bad:
        raise ValueError(f"task names {bad} cannot name adapters: use non-empty names without '.'")
    in_backbone = [(f"backbone.{n}" if n else "backbone", m) for n, m in backbone.named_modules()]
    chosen = _chosen(in_backbone, targets)
    if not chosen:
        raise ValueError(
            "no layer to adapt: the backbone has no layer matching targets "
            f"{targets or 'nn.Linear'}; pass targets= (paths, layer types such as (nn.Conv2d,), or 'all')"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALayer(getattr(parent, child), tasks, rank, rank if alpha is None else alpha))
    return LoRASplit(model, tasks, chosen)
