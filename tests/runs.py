"""Runs with a known shape, for the summary, the figures and the HTML report: Grams drawn at random (seeded) so
that every number can be recomputed independently from the reports themselves."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gradconflict import ConflictMonitor, ConflictReport, History, JSONLSink, LayerReport

LAYERS = [f"enc.layer.{k}" for k in range(4)]


def drawn_run(kind: str = "partial", steps: int = 40, seed: int = 0, layers: bool = True) -> History:
    """``kind="full"``: tasks a, b, c on every step. ``"partial"``: a and b on every step (listed b first on odd
    steps), c with them on every fifth. ``"round_robin"``: one task per step. Every task's gradient is a common
    direction plus a smaller independent part (they agree), except on the two top layers, where b's gradient is
    minus a's plus noise (a and b conflict there). Every third step weighs the tasks (1, 0.5, 2)."""
    g = torch.Generator().manual_seed(seed)
    history = History(max_history=None)
    for s in range(steps):
        if kind == "round_robin":
            names = "abc"[s % 3]
        elif kind == "full":
            names = "abc"
        else:
            names = "abc" if s % 5 == 0 else ("ba" if s % 2 else "ab")
        k = len(names)
        grams = {}
        for depth, name in enumerate(LAYERS):
            common = torch.randn(12, generator=g, dtype=torch.float64)
            J = common + 0.5 * torch.randn(k, 12, generator=g, dtype=torch.float64)  # the tasks agree ...
            if depth >= 2 and "a" in names and "b" in names:
                # ... except at the top, where b opposes a
                J[names.index("b")] = -J[names.index("a")] + 0.3 * torch.randn(12, generator=g, dtype=torch.float64)
            grams[name] = J @ J.T
        weights = torch.tensor([(1.0, 0.5, 2.0)["abc".index(t)] if s % 3 == 0 else 1.0 for t in names],
                               dtype=torch.float64)
        layer_reports = (
            {n: LayerReport(n, tuple(names), G, weights, num_params=12) for n, G in grams.items()} if layers else {}
        )
        losses = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        history.append(ConflictReport(tuple(names), sum(grams.values()), weights, losses=losses,
                                      layers=layer_reports, step=s))
    return history


def cosine(G: np.ndarray, i: int, j: int) -> float:
    """``G_ij / sqrt(G_ii G_jj)``, from the definition."""
    return float(G[i, j] / np.sqrt(G[i, i] * G[j, j]))


def pair_values(history: History, a: str, b: str, layer: str | None = None) -> tuple[list[int], list[float]]:
    """Steps carrying both tasks, and the pair's cosine on each, straight from the reports' Grams."""
    steps, values = [], []
    for r in history.measured:
        if a in r.tasks and b in r.tasks:
            G = (r.layers[layer].gram if layer else r.gram).double().numpy()
            steps.append(r.step)
            values.append(cosine(G, r.tasks.index(a), r.tasks.index(b)))
    return steps, values


def planted_run(path=None, seed=0, steps=300, exclude=()):
    """Two tasks with the same target but on a planted 5% of the examples (a region of input space, flag feature
    0), where task b's target is twice minus a's: measured with sample_ids on every step. On this seed the
    pair's conflict oscillates at chance over the run. ``exclude``: ids left out of the data (the batches are drawn
    from the others). Returns ``(monitor, planted ids, per-step attributions)``."""
    torch.manual_seed(seed)
    n = 400
    X = torch.randn(n, 8)
    y = X @ torch.randn(8, 1) / 3
    planted = torch.randperm(n)[: n // 20]
    X[:, 0] = 0.0
    X[planted, 0] = 3.0
    target_b = y.clone()
    target_b[planted] = -2 * y[planted]
    backbone = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    heads = nn.ModuleDict({"a": nn.Linear(64, 1), "b": nn.Linear(64, 1)})
    model = nn.ModuleDict({"backbone": backbone, "heads": heads})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = torch.Generator().manual_seed(seed + 1)
    steps_seen = []
    kept = torch.tensor([i for i in range(n) if i not in set(exclude)])
    with ConflictMonitor(model, shared=backbone, sinks=[JSONLSink(path)] if path else []) as monitor:
        for _ in range(steps):
            ids = kept[torch.randint(0, len(kept), (64,), generator=batches)]
            h = backbone(X[ids])
            losses = {"a": (heads["a"](h) - y[ids]).pow(2).mean(), "b": (heads["b"](h) - target_b[ids]).pow(2).mean()}
            report = monitor.backward(losses, sample_ids=ids)
            optimizer.step()
            optimizer.zero_grad()
            steps_seen.append(report.samples)
    return monitor, set(planted.tolist()), steps_seen
