"""Monitor a two-task regression whose tasks pull the shared layer in opposite directions.

Run: python examples/train_two_tasks.py
"""

import torch
from torch import nn

from gradconflict import ConflictMonitor

torch.manual_seed(0)
backbone = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
heads = nn.ModuleDict({"up": nn.Linear(64, 1), "down": nn.Linear(64, 1)})
model = nn.ModuleDict({"backbone": backbone, "heads": heads})
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
w = torch.randn(10, 1)

with ConflictMonitor(model, shared=backbone) as monitor:
    for step in range(100):
        x = torch.randn(128, 10)
        h = backbone(x)
        # "down" wants the negated target of "up" from the same features: a built-in conflict.
        losses = {
            "up": (heads["up"](h) - x @ w).pow(2).mean(),
            "down": (heads["down"](h) - (x @ w).abs()).pow(2).mean(),
        }
        report = monitor.backward(losses)
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            print(report.summary())

print("EMA of the conflict fraction:", round(float(monitor.history.ema["conflict_fraction"]), 3))
for name, layer in report.layers.items():
    print(f"{name}: cosine {float(layer.cosine[0, 1]):+.3f}, {layer.num_params} parameters, route {layer.route}")
