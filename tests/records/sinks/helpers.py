"""Reports whose numbers are known by construction, and a small monitored training run with an independent
oracle (each task's gradient from its own ``torch.autograd.grad`` in float64)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradconflict import ConflictMonitor, ConflictReport, LayerReport

# Three tasks: norms 2, 3 and 1; cos(a, b) = -2 / 6, cos(a, c) = 0, cos(b, c) = 3 / 3 = 1.
GRAM = torch.tensor([[4.0, -2.0, 0.0], [-2.0, 9.0, 3.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
# Its two layers: the bottom one agrees, the top one holds the conflict; they sum to GRAM.
BOTTOM = torch.tensor([[1.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
TOP = GRAM - BOTTOM


def known_report(step: int = 0, tasks: str = "abc", weights=(1.0, 1.0, 1.0), losses=(0.5, 2.0, 1.5)) -> ConflictReport:
    """A three-task step with :data:`GRAM` (rows in the order of ``tasks``, a permutation of ``"abc"``)."""
    index = torch.tensor(["abc".index(t) for t in tasks])

    def pick(M: torch.Tensor) -> torch.Tensor:
        return M[index][:, index]

    w = torch.tensor(weights, dtype=torch.float64)
    layers = {
        "body.0": LayerReport("body.0", tuple(tasks), pick(BOTTOM), w, num_params=10),
        "body.1": LayerReport("body.1", tuple(tasks), pick(TOP), w, num_params=10),
    }
    L = torch.tensor(losses, dtype=torch.float64)[index]
    return ConflictReport(tuple(tasks), pick(GRAM), w, losses=L, layers=layers, step=step)


def expected_cosine(G: torch.Tensor, i: int, j: int) -> float:
    return float(G[i, j]) / math.sqrt(float(G[i, i]) * float(G[j, j]))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"a": (self.heads["a"](h) - y).pow(2).mean(), "b": (self.heads["b"](h) + y * y).pow(2).mean()}


def oracle_cosine(model: TwoHeads, losses: dict[str, torch.Tensor]) -> float:
    """cos(g_a, g_b) on the backbone from two separate ``autograd.grad`` calls (float64 model)."""
    params = list(model.backbone.parameters())
    g = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(losses[k], params, retain_graph=True)]) for k in "ab"]
    return float(g[0] @ g[1] / (g[0].norm() * g[1].norm()))


def monitored_run(sink, steps: int = 3) -> list[float]:
    """Train :class:`TwoHeads` (float64) for ``steps`` steps with ``sink`` on the monitor, checking at each step
    that ``.grad`` is the plain loop's; returns the oracle cosine of each step."""
    torch.set_default_dtype(torch.float64)
    try:
        model, twin = TwoHeads(), TwoHeads()
        twin.load_state_dict(model.state_dict())
        expected = []
        with ConflictMonitor(model, shared=model.backbone, sinks=[sink]) as monitor:
            for _ in range(steps):
                x, y = torch.randn(16, 3), torch.randn(16, 1)
                losses = model.losses(x, y)
                expected.append(oracle_cosine(model, losses))
                monitor.backward(losses)
                sum(twin.losses(x, y).values()).backward()
                for p, q in zip(model.parameters(), twin.parameters()):
                    assert torch.equal(p.grad, q.grad)  # the sink changes nothing in training
    finally:
        torch.set_default_dtype(torch.float32)
    return expected
