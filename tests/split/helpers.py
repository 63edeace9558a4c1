"""Small multi-task models and data shared by the split tests."""

from __future__ import annotations

import torch
from torch import nn

from gradconflict.split import MultiTaskNet


def mlp_net(width: int = 8, tasks: tuple[str, ...] = ("a", "b")) -> MultiTaskNet:
    backbone = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
    return MultiTaskNet(backbone, {t: nn.Linear(width, 1) for t in tasks})


def batches(n: int = 3, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [(x, {"a": x[:, :1] * 2, "b": x[:, 1:2].sin()}) for x in torch.randn(n, size, 4, generator=g)]


MSE = {"a": nn.functional.mse_loss, "b": nn.functional.mse_loss}

