import pytest
import torch
from torch import nn

from gradconflict.diagnosis import head_stats, linear_cka


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 10, generator=g)
    assert linear_cka(X, X) == pytest.approx(1.0)
    Q = torch.linalg.qr(torch.randn(10, 10, generator=g))[0]
    assert linear_cka(X, 5 * X @ Q + 3) == pytest.approx(1.0)  # rotation, scale, shift
    assert linear_cka(X, torch.randn(200, 10, generator=g)) < 0.2
    assert linear_cka(X, X[:, :1]) < 0.5  # one of ten directions kept
    assert linear_cka(X, torch.ones(200, 3)) == 0.0
    assert linear_cka(torch.randn(5, 2, 3, generator=g), torch.randn(5, 6, generator=g)) <= 1.0  # flattened
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(X, X[:10])


class Net(nn.Module):
    def __init__(self, deep_head: bool) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        deep = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.heads = nn.ModuleDict({"light": nn.Linear(8, 1), "deep": deep if deep_head else nn.Linear(8, 1)})

    def forward(self, x):
        h = self.backbone(x)
        return {t: head(h) for t, head in self.heads.items()}


def test_head_stats_sizes_depth_and_rewriting():
    torch.manual_seed(0)
    model = Net(deep_head=True)
    stats = {s.task: s for s in head_stats(model.heads, model.backbone, model=model, probe=torch.randn(128, 4))}
    backbone = 4 * 8 + 8
    assert stats["light"].num_params == 9 and stats["light"].ratio == pytest.approx(9 / backbone)
    assert stats["light"].depth == 1 and stats["light"].cka == pytest.approx(1.0)  # reads the features as they are
    assert stats["deep"].depth == 3 and stats["deep"].ratio > 10
    assert stats["deep"].cka < 0.95
    assert model.training  # mode restored
    no_probe = head_stats(model.heads, model.backbone)
    assert all(s.cka is None for s in no_probe)
