"""Step 2, the logical split: freeze the shared backbone and give each task its own low-rank adapter (LoRA).

Each adapted weight ``W`` (a matrix, or a convolution kernel read as the matrix ``out x (in * kernel)``) becomes
``W + (alpha / rank) * B_t A_t`` for the active task ``t``. The sum is the layer's weight itself, through
:func:`torch.nn.utils.parametrize.register_parametrization`: the layer keeps its own forward and ``.weight`` stays
a tensor, so code that reads a layer's weight directly still works (``nn.MultiheadAttention`` reads its
projections' weights, and ``nn.TransformerEncoderLayer`` its attention's, in its fast-path check and in
``F.multi_head_attention_forward``). ``B_t`` starts at zero, so a fresh split computes exactly what the model
computed.

The weights LoRA adapts here: ``nn.Linear`` (subclasses included, such as the attention's ``out_proj``), Hugging
Face's ``Conv1D`` (GPT-2's linear layer, its weight stored transposed), ``nn.MultiheadAttention``'s input
projections, convolutions (any groups and padding mode) and ``nn.Embedding``.

>>> import torch, torch.nn as nn
>>> from gradconflict.split import MultiTaskNet
>>> torch.manual_seed(0) and None
>>> net = MultiTaskNet(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
>>> split = lora_split(net, rank=2)
>>> split.layer_names
['model.backbone.0.weight']
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
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gradconflict.split.model import check_convention

__all__ = ["LoRALayer", "LoRASplit", "adaptable", "lora_split"]


def _transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D``: a linear layer whose weight is stored ``in x out``."""
    utils = sys.modules.get("transformers.pytorch_utils")  # loaded wherever such a layer exists
    return utils is not None and type(module) is getattr(utils, "Conv1D", None)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _transposed_linear(module)


def _own_weights(module: nn.Module) -> list[tuple[str, str]]:
    """``(path under module, tensor name)`` of the weights LoRA adapts in ``module`` itself; for an
    ``nn.MultiheadAttention`` its input projections and its ``out_proj``."""
    if isinstance(module, nn.MultiheadAttention):
        separate = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        inputs = ["in_proj_weight"] if module._qkv_same_embed_dim else separate
        return [("", name) for name in inputs] + [("out_proj", "weight")]
    if _is_linear(module) or isinstance(module, (nn.modules.conv._ConvNd, nn.Embedding)):
        return [("", "weight")]
    return []


def adaptable(module: nn.Module) -> bool:
    """Whether :func:`lora_split` can adapt ``module``: an ``nn.Linear`` (or subclass), Hugging Face's ``Conv1D``,
    an ``nn.MultiheadAttention``, a convolution or an ``nn.Embedding``.

    >>> import torch.nn as nn
    >>> adaptable(nn.Linear(2, 2)), adaptable(nn.Conv2d(4, 4, 3, groups=2)), adaptable(nn.ReLU())
    (True, True, False)
    """
    return bool(_own_weights(module))


class LoRALayer(nn.Module):
    """The adapters of one frozen weight, one low-rank pair per task: a parametrization that returns the weight
    plus the active task's update (:func:`torch.nn.utils.parametrize.register_parametrization`).

    Args:
        weight: the weight to adapt (its shape, dtype and device size the adapters).
        tasks: one adapter per task name.
        rank: the adapters' rank ``r``.
        alpha: scale numerator; the update is scaled by ``alpha / r``.
        transposed: the weight is stored ``in x out`` (Hugging Face's ``Conv1D``).

    Attributes:
        down: task -> ``A_t``, ``r x in`` (``in``: the weight's entries per output, a kernel's included).
        up: task -> ``B_t``, ``out x r``, zero at the start.
        active: the task whose adapter is applied (``None``: the base weight alone).
        merged: the task whose adapter is currently added into the base weight (see :meth:`merge`).

    >>> import torch, torch.nn as nn
    >>> layer = LoRALayer(torch.zeros(2, 3), ["a"], rank=1, alpha=1.0)
    >>> tuple(layer.down["a"].shape), tuple(layer.up["a"].shape)
    ((1, 3), (2, 1))
    """

    def __init__(
        self, weight: Tensor, tasks: Sequence[str], rank: int, alpha: float, transposed: bool = False
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError("the backbone has a lazy layer whose weight is not yet made: run the model once first")
        self.scale = alpha / rank
        self.shape = tuple(weight.shape)
        self.transposed = transposed
        self.active: str | None = None
        self.merged: str | None = None
        self._original: Tensor | None = None
        self._owner: tuple[nn.Module, str] | None = None  # the parametrized module and tensor, set by lora_split
        matrix = weight.detach().T if transposed else weight.detach().flatten(1)
        out_features, in_features = matrix.shape
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for task in tasks:
            down = torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device)
            # the usual default init of a layer's weight, with the fan-in of the weight adapted
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down[task] = nn.Parameter(down)
            up = torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device)
            self.up[task] = nn.Parameter(up)  # zero: the adapter starts as a no-op

    def delta_weight(self, task: str) -> Tensor:
        """The change ``(alpha / r) B_t A_t`` that ``task``'s adapter makes to the weight (same shape).

        >>> import torch
        >>> LoRALayer(torch.zeros(4, 3, 3, 3), ["a"], rank=2, alpha=2.0).delta_weight("a").abs().sum().item()
        0.0
        """
        delta = self.scale * (self.up[task] @ self.down[task])
        return delta.T if self.transposed else delta.reshape(self.shape)

    def forward(self, weight: Tensor) -> Tensor:
        """The weight the layer computes with: the base plus the active task's update (none when no task is
        active, or when that task is merged in)."""
        task = self.active
        if task is None or task == self.merged:
            return weight  # a merged adapter is already inside the base weight
        if self.merged is not None:
            raise RuntimeError(
                f"task {self.merged!r} is merged into the base weights; call unmerge() before routing to {task!r}"
            )
        return weight + self.delta_weight(task)

    def _base(self) -> Tensor:
        if self._owner is None:
            raise RuntimeError("this LoRALayer adapts no module: lora_split() attaches it")
        module, name = self._owner
        base = module.get_parameter(f"parametrizations.{name}.original")  # the frozen weight under the adapters
        return base

    def merge(self, task: str) -> None:
        """Add ``task``'s adapter into the base weight (the original is kept, for an exact unmerge)."""
        if self.merged == task:
            return
        self.unmerge()
        base = self._base()
        self._original = base.detach().clone()
        with torch.no_grad():
            base.add_(self.delta_weight(task))
        self.merged = task

    def unmerge(self) -> None:
        """Restore the base weight, bit for bit, as it was before :meth:`merge`."""
        if self._original is not None:
            with torch.no_grad():
                self._base().copy_(self._original)
        self._original, self.merged = None, None


class LoRASplit(nn.Module):
    """A model whose frozen backbone carries one LoRA adapter per task; built by :func:`lora_split`.

    ``split(x)`` returns ``{task: output}`` with each task's output computed under its own adapter (the backbone
    runs once per task); ``split(x, task="a")`` returns task ``a``'s output alone. To route a call of the
    wrapped model by hand, use ``with split.task("a"): model(x)``.

    Attributes:
        model: the adapted model (changed in place by :func:`lora_split`).
        tasks: the task names, one adapter each.
        layer_names: paths (in this module) of the adapted weights, such as ``model.backbone.0.weight``.

    >>> import torch, torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> split = lora_split(MultiTaskNet(nn.Linear(3, 4), {"a": nn.Linear(4, 1)}), targets=["backbone"], rank=2)
    >>> split(torch.zeros(2, 3), task="a").shape
    torch.Size([2, 1])
    """

    def __init__(self, model: nn.Module, tasks: Sequence[str], layers: Mapping[str, LoRALayer]) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.layer_names = [f"model.{n}" for n in layers]
        self._layers = list(layers.values())  # held as a list: they are registered under the model already
        self.train(model.training)

    def train(self, mode: bool = True) -> LoRASplit:
        """Set training mode, but keep the backbone's running-statistics layers (BatchNorm...) in eval mode.

        The backbone is frozen and shared by every task: if one task's batches moved its normalisation
        statistics, they would change the function every other task sees.
        """
        super().train(mode)
        for module in self.model.get_submodule("backbone").modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.eval()
        return self

    @property
    def layers(self) -> dict[str, LoRALayer]:
        """Path of the adapted weight -> its adapters."""
        return dict(zip(self.layer_names, self._layers))

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
        ...     split.layers["model.backbone.weight"].active
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
        """Number of frozen parameter entries (the shared backbone, and anything frozen before)."""
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


def _chosen(backbone: nn.Module, targets: str | Sequence[str | type] | None) -> dict[str, tuple[nn.Module, str]]:
    """``{path of the weight in the model: (module, tensor name)}`` for the weights ``targets`` selects (see
    :func:`lora_split`), in the backbone's order."""
    modules = [(f"backbone.{n}" if n else "backbone", m) for n, m in backbone.named_modules()]
    if targets is None:
        picked = [(n, m) for n, m in modules if _is_linear(m) or isinstance(m, nn.MultiheadAttention)]
    elif targets == "all":
        picked = modules
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        if all(isinstance(t, type) for t in targets):
            picked = [(n, m) for n, m in modules if isinstance(m, tuple(targets))]  # type: ignore[arg-type]
        else:
            paths = dict(modules)
            unknown = [t for t in targets if t not in paths]
            if unknown:
                raise ValueError(f"targets {unknown} are not modules of the backbone (paths start with 'backbone')")
            # a path adapts every weight inside the module it names (a whole block, or one layer)
            picked = [(n, m) for n, m in modules if any(n == t or n.startswith(f"{t}.") for t in targets)]
    out: dict[str, tuple[nn.Module, str]] = {}
    for path, module in picked:
        for sub, tensor in _own_weights(module):
            owner = module.get_submodule(sub) if sub else module
            out[".".join(p for p in (path, sub, tensor) if p)] = (owner, tensor)
    return out


def lora_split(
    model: nn.Module,
    tasks: Sequence[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    targets: str | Sequence[str | type] | None = None,
) -> LoRASplit:
    """Freeze ``model``'s backbone and attach one LoRA adapter per task to its weights, in place.

    Args:
        model: a model following the convention (``.backbone``, ``.heads``). Each chosen weight is parametrized
            (:func:`torch.nn.utils.parametrize.register_parametrization`): the layer keeps its class, its forward
            and a tensor ``.weight``; in the state dict the frozen weight moves to
            ``<layer>.parametrizations.weight.original`` and the adapters sit beside it.
        tasks: adapter names; default: the model's heads.
        rank: adapter rank ``r``.
        alpha: scale numerator (update scaled by ``alpha / r``); default ``r``, a scale of 1.
        targets: which weights to adapt: module paths in ``model`` (``["backbone.0", "backbone.encoder.layer.2"]``:
            every weight LoRA adapts inside each), module types (``(nn.Conv2d,)``), or ``"all"`` (every
            weight LoRA adapts, see :func:`adaptable`: linear layers, attention, convolutions, embeddings);
            default: the backbone's linear maps, every ``nn.Linear`` (and Hugging Face ``Conv1D``) and
            ``nn.MultiheadAttention``'s projections.

    The whole backbone is frozen (also layers that get no adapter); heads keep training. Train with one optimizer
    over ``split.trainable_parameters()``; the base weights stay bit-identical.

    >>> import torch.nn as nn
    >>> from gradconflict.split import MultiTaskNet
    >>> net = MultiTaskNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), {"a": nn.LazyLinear(1)})
    >>> lora_split(net, rank=2, targets=(nn.Conv2d,)).layer_names
    ['model.backbone.0.weight']
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
    chosen = _chosen(backbone, targets)
    if not chosen:
        raise ValueError(
            "no layer to adapt: the backbone has no layer matching targets "
            f"{targets or 'nn.Linear'}; pass targets= (paths, layer types such as (nn.Conv2d,), or 'all')"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)
    layers = {}
    for path, (module, tensor) in chosen.items():
        weight = getattr(module, tensor)
        layer = LoRALayer(weight, tasks, rank, rank if alpha is None else alpha, _transposed_linear(module))
        parametrize.register_parametrization(module, tensor, layer)
        layer._owner = (module, tensor)
        layers[path] = layer
    return LoRASplit(model, tasks, layers)
