"""The benchmark workloads: multi-task models with a shared ``.backbone`` and T linear ``.heads``.

Every model's forward returns ``{"t0": y0, ..., "t{T-1}": y_{T-1}}``; the loss of task ``i`` is the mean
squared error to a random target of scale ``1 + i / 2`` (so the tasks differ in gradient size), reduced per
sample first (``per_sample_losses``) so that a peer that wants per-sample losses (TorchJD with
``batch_dim=0``) can have them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

HEAD_DIM = 8


class MultiTask(nn.Module):
    """``backbone`` shared by ``T`` linear heads ``t0 .. t{T-1}``."""

    def __init__(self, backbone: nn.Module, features: int, tasks: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({f"t{i}": nn.Linear(features, HEAD_DIM) for i in range(tasks)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.backbone(x)
        return {name: head(h) for name, head in self.heads.items()}


class MeanPool(nn.Module):
    """Mean over the sequence axis of a batch-first ``[B, S, d]`` tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


def mlp(tasks: int, width: int = 512, depth: int = 4, d_in: int = 512) -> MultiTask:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return MultiTask(nn.Sequential(*layers), width, tasks)


def transformer(tasks: int, d: int = 256, layers: int = 4, heads: int = 4) -> MultiTask:
    layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return MultiTask(nn.Sequential(encoder, MeanPool()), d, tasks)


def cnn(tasks: int) -> MultiTask:
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    backbone = nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return MultiTask(backbone, 128, tasks)


class GPT2Backbone(nn.Module):
    """GPT-2 small (124M parameters) built from its configuration (no download), mean-pooled over positions."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        # no dropout: every route, and the float64 oracle, must see the same forward
        self.gpt2 = GPT2Model(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt2(input_ids=ids).last_hidden_state.mean(1)


def gpt2_small(tasks: int) -> MultiTask:
    return MultiTask(GPT2Backbone(), 768, tasks)


class Bottleneck(nn.Module):
    """ResNet's bottleneck block: 1x1, 3x3 (stride), 1x1 convolutions with BatchNorm, and a projected shortcut
    where the shape changes."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet50(tasks: int) -> MultiTask:
    """ResNet-50 (He et al. 2016: stages of 3, 4, 6, 3 bottleneck blocks), built here from scratch."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ]
    c_in = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for k in range(blocks):
            layers.append(Bottleneck(c_in, width, stride if k == 0 else 1))
            c_in = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return MultiTask(nn.Sequential(*layers), c_in, tasks)


@dataclass
class Workload:
    """One benchmark workload: how to build its model and its batch."""

    name: str
    build: Callable[[int], MultiTask]
    input_shape: tuple[int, ...]  # with the batch axis first
    description: str
    batchnorm: bool = False  # BatchNorm couples the samples: TorchJD's batch_dim=0 mode does not apply
    ghost: bool = False  # a workload where the ghost (kernel) rule of Linear layers is the cheaper route
    heavy: bool = False  # seconds per step on a small CPU: no extra warm-up beyond the first call, 2 reps minimum
    vocab: int = 0  # > 0: the input is token ids below this, not a float tensor

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def model(self, tasks: int, seed: int = 0) -> MultiTask:
        torch.manual_seed(seed)
        return self.build(tasks)

    def data(self, tasks: int, seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        """A fixed batch ``x`` and one target per task (float32, CPU; the caller moves/casts them)."""
        gen = torch.Generator().manual_seed(seed)
        if self.vocab:
            x = torch.randint(self.vocab, self.input_shape, generator=gen)
        else:
            x = torch.randn(*self.input_shape, generator=gen)
        targets = {
            f"t{i}": (1.0 + i / 2) * torch.randn(self.batch, HEAD_DIM, generator=gen) for i in range(tasks)
        }
        return x, targets


def per_sample_losses(out: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{task: [B] per-sample losses}``."""
    return {k: (out[k] - targets[k]).pow(2).mean(-1) for k in out}


def task_losses(out: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{task: scalar loss}`` (the mean of :func:`per_sample_losses`)."""
    return {k: v.mean() for k, v in per_sample_losses(out, targets).items()}


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("mlp-b64", mlp, (64, 512), "MLP 4x512 (ReLU), input 512, B=64", ghost=True),
        Workload("mlp-b512", mlp, (512, 512), "MLP 4x512 (ReLU), input 512, B=512"),
        Workload(
            "wide-linear", lambda t: mlp(t, width=2048, depth=8, d_in=2048), (16, 2048),
            "MLP 8x2048 (ReLU), input 2048, B=16: the peak-memory case (34M shared parameters, small activations)",
            ghost=True,
        ),
        Workload(
            "transformer", transformer, (16, 128, 256),
            "Transformer encoder, 4 layers, d=256, 4 heads, FF 1024, dropout 0, seq 128, B=16, mean-pool",
            heavy=True,
        ),
        Workload(
            "cnn", cnn, (32, 3, 32, 32), "CNN 3x(conv3x3 + BatchNorm + ReLU) 32/64/128 ch, 3x32x32, B=32, avg-pool",
            batchnorm=True,
        ),
        Workload(
            "gpt2-small", gpt2_small, (2, 64), "GPT-2 small (124M, from its config), 64 tokens, B=2, mean-pool",
            heavy=True, vocab=50257,
        ),
        Workload(
            "resnet50", resnet50, (4, 3, 64, 64), "ResNet-50 from scratch (BatchNorm), 3x64x64, B=4",
            heavy=True, batchnorm=True,
        ),
    ]
}

#: the models at real scale: only with ``--full`` (minutes per table on 2 CPU cores)
REAL_SCALE = ("gpt2-small", "resnet50")

#: tiny versions of every workload for ``--smoke``
SMOKE: dict[str, Workload] = {
    "mlp-b64": Workload("mlp-b64", lambda t: mlp(t, width=32, d_in=16), (8, 16), "tiny MLP", ghost=True),
    "mlp-b512": Workload("mlp-b512", lambda t: mlp(t, width=16, d_in=16), (64, 16), "tiny MLP, big batch"),
    "transformer": Workload("transformer", lambda t: transformer(t, d=16, layers=2, heads=2), (4, 8, 16),
                            "tiny transformer"),
    "cnn": Workload("cnn", cnn, (4, 3, 8, 8), "CNN on 8x8 images", batchnorm=True),
}
