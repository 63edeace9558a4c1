"""Monitor a plain PyTorch training loop whose two tasks agree on one thing and pull in opposite directions on
another, and watch the conflict take over as the part they agree on is learned.

Both tasks read the shared backbone through the same fixed readout (frozen: a trainable head could simply learn
to negate its input and hide the disagreement from the backbone). Task ``up`` wants ``g(x) + f(x)``, task
``down`` wants ``g(x) - f(x``: they agree on ``g`` and disagree on ``f``. Early on both gradients mostly ask for
``g``, so they point the same way; once ``g`` is learned only the disagreement on ``f`` is left, which no shared
backbone can satisfy for both, and their cosine goes to -1 and stays there. The script checks that it did.

Run: python examples/train_two_tasks.py   (a few seconds on a CPU)
"""

import torch
from torch import nn

from gradconflict import ConflictMonitor

torch.manual_seed(0)
backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
readout = nn.Linear(1, 1)
readout.requires_grad_(False)  # one fixed readout for both tasks
model = nn.ModuleDict({"backbone": backbone, "heads": nn.ModuleDict({"up": readout, "down": readout})})
optimizer = torch.optim.Adam(backbone.parameters(), lr=5e-3)
u, v = torch.linalg.qr(torch.randn(8, 2))[0].T  # two orthogonal directions of the input


def targets(x):
    g, f = 2 * torch.sin(x @ u), 0.5 * torch.sin(x @ v)
    return (g + f).unsqueeze(1), (g - f).unsqueeze(1)


cosines = []
with ConflictMonitor(model, shared=backbone) as monitor:
    for step in range(200):
        x = torch.randn(64, 8)
        y_up, y_down = targets(x)
        h = backbone(x)
        losses = {"up": (readout(h) - y_up).pow(2).mean(), "down": (readout(h) - y_down).pow(2).mean()}
        report = monitor.backward(losses)  # replaces (losses["up"] + losses["down"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        cosines.append(float(report.cosine[0, 1]))
        if step % 50 == 0 or step == 199:
            print(report.summary())

early, late = sum(cosines[:20]) / 20, sum(cosines[-50:]) / 50
print(f"mean cosine of the two tasks' gradients: first 20 steps {early:+.2f}, last 50 steps {late:+.2f}")
for name, layer in report.layers.items():
    print(f"  {name}: cosine {float(layer.cosine[0, 1]):+.3f}, {layer.num_params} parameters")
print("EMA of the conflict fraction:", round(float(monitor.history.ema["conflict_fraction"]), 3))
assert early > 0.5 and late < -0.5, "expected agreement first, then a conflict that persists"
