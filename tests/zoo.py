"""Small multi-task models of many families, and the independent float64 reference the engine is checked
against: T separate ``torch.autograd.grad`` calls, flattened, ``J @ J.T``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiTask(nn.Module):
    """``backbone`` then one head per task; ``losses(x)`` returns ``{task: scalar}``."""

    def __init__(
        self, backbone: nn.Module, heads: dict[str, nn.Module], pool: Callable[[Tensor], Tensor] | None = None
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.pool = pool

    def forward(self, x):
        h = self.backbone(x)
        if self.pool is not None:
            h = self.pool(h)
        return {t: head(h) for t, head in self.heads.items()}


def losses_of(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    # Different, non-trivial losses per task so that task gradients differ in direction and size.
    return {t: ((o - k * 0.3) ** 2).mean() * (k + 1) + o.sin().mean() for k, (t, o) in enumerate(outputs.items())}


def linear_heads(d: int, T: int) -> dict[str, nn.Module]:
    return {f"t{i}": nn.Linear(d, 1) for i in range(T)}


def mlp(T: int = 3) -> tuple[nn.Module, Tensor]:
    bb = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 12))
    return MultiTask(bb, linear_heads(12, T)), torch.randn(20, 6)


def wide_mlp(T: int = 3) -> tuple[nn.Module, Tensor]:
    # Few rows, wide layers: the Linear rule takes its ghost route here.
    bb = nn.Sequential(nn.Linear(64, 96), nn.ReLU(inplace=True), nn.Linear(96, 80), nn.Tanh())
    return MultiTask(bb, linear_heads(80, T)), torch.randn(5, 64)


def cnn(T: int = 3) -> tuple[nn.Module, Tensor]:
    bb = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding="same", dilation=2, padding_mode="reflect"),
        nn.AvgPool2d(2),
    )
    return MultiTask(bb, linear_heads(24, T), pool=lambda h: h.flatten(1)), torch.randn(2, 3, 16, 16)


def conv1d_3d(T: int = 3) -> tuple[nn.Module, Tensor]:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.c3 = nn.Conv3d(1, 3, 2, padding="same", bias=False)

        def forward(self, x):
            h = self.gn(self.c1(x)).relu()  # [B, 4, 5]
            v = self.c3(h.unsqueeze(1).unsqueeze(-1).expand(-1, 1, 4, 5, 2))
            return v.flatten(1)

    return MultiTask(Net(), linear_heads(3 * 4 * 5 * 2, T)), torch.randn(3, 2, 10)


def transformer(T: int = 3) -> tuple[nn.Module, Tensor]:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.enc(x).mean(1)

    return MultiTask(Net(), linear_heads(16, T)), torch.randn(3, 5, 16)


def embedding_layernorm(T: int = 3) -> tuple[nn.Module, Tensor]:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8, padding_idx=0)
            self.norm = nn.LayerNorm(8)
            self.rms = nn.RMSNorm(8)
            self.proj = nn.Linear(8, 8)

        def forward(self, ids):
            return self.proj(self.rms(self.norm(self.emb(ids)))).mean(1)

    ids = torch.tensor([[1, 2, 3, 0, 2], [4, 4, 0, 5, 10]])
    return MultiTask(Net(), linear_heads(8, T)), ids


def reused_module(T: int = 3) -> tuple[nn.Module, Tensor]:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.block = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.block(torch.tanh(self.block(h)))  # the same Linear, twice

    return MultiTask(Net(), linear_heads(8, T)), torch.randn(7, 5)


def raw_parameter(T: int = 3) -> tuple[nn.Module, Tensor]:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 8)
            self.scale = nn.Parameter(torch.rand(8) + 0.5)
            self.mix = nn.Parameter(torch.randn(8, 8) / 3)

        def forward(self, x):
            return torch.tanh(self.lin(x) * self.scale) @ self.mix

    return MultiTask(Net(), linear_heads(8, T)), torch.randn(6, 5)


def tied_weights(T: int = 3) -> tuple[nn.Module, Tensor]:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 6)
            self.lin = nn.Linear(6, 6)

        def forward(self, ids):
            h = torch.tanh(self.lin(self.emb(ids)))
            return F.linear(h, self.emb.weight).mean(1)  # the embedding matrix, used again as an output layer

    ids = torch.tensor([[1, 2, 3], [4, 8, 2]])
    return MultiTask(Net(), linear_heads(9, T)), ids


def deep_heads(T: int = 3) -> tuple[nn.Module, Tensor]:
    bb = nn.Sequential(nn.Linear(4, 10), nn.SiLU(), nn.Linear(10, 10))
    heads = {
        f"t{i}": nn.Sequential(*[m for _ in range(i) for m in (nn.Linear(10, 10), nn.Tanh())], nn.Linear(10, 1))
        for i in range(T)
    }
    return MultiTask(bb, heads), torch.randn(9, 4)


FAMILIES: dict[str, Callable[..., tuple[nn.Module, Tensor]]] = {
    "mlp": mlp,
    "wide_mlp": wide_mlp,
    "cnn": cnn,
    "conv1d_3d": conv1d_3d,
    "transformer": transformer,
    "embedding_layernorm": embedding_layernorm,
    "reused_module": reused_module,
    "raw_parameter": raw_parameter,
    "tied_weights": tied_weights,
    "deep_heads": deep_heads,
}


@dataclass
class Reference:
    gram: Tensor
    layers: dict[str, Tensor]


def reference(model: nn.Module, losses: dict[str, Tensor]) -> Reference:
    """Float64 oracle over the backbone: T separate autograd.grad calls, flattened, J @ J.T, and per layer."""
    names = {id(p): n for n, p in model.named_parameters()}
    shared = list(model.backbone.parameters())
    rows = []
    for loss in losses.values():
        rows.append(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True, materialize_grads=True))
    J = torch.stack([torch.cat([g.flatten() for g in r]) for r in rows])
    layers: dict[str, Tensor] = {}
    for k, p in enumerate(shared):
        layer = names[id(p)].rsplit(".", 1)[0]
        Jp = torch.stack([r[k].flatten() for r in rows])
        layers[layer] = layers.get(layer, 0) + Jp @ Jp.T
    return Reference(J @ J.T, layers)


def backward_reference(model: nn.Module, run: Callable[[nn.Module], dict[str, Tensor]], shared) -> Tensor:
    """Float64 oracle that needs no ``autograd.grad`` (which reentrant checkpoints refuse): for each task, a fresh
    copy of ``model`` runs ``run(copy) -> losses`` and a plain ``losses[task].backward()``; the rows are the
    ``.grad`` of ``shared(copy)`` (zero where ``None``), and the Gram is ``J @ J.T``. Every copy starts from the
    same parameters and buffers; ``run`` seeds whatever randomness the forward draws."""
    rows = []
    for task in run(copy.deepcopy(model)):
        twin = copy.deepcopy(model)
        run(twin)[task].backward()
        rows.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).to_dense().flatten() for p in shared(twin)
        ]))
    J = torch.stack(rows)
    return J @ J.T
