"""``ConflictReport.to_dict`` (each JSONL line) computes every layer's quantities in batches: the numbers equal
each Gram's own, computed one by one with the metrics functions."""

from __future__ import annotations

import json
import math

import torch

from gradconflict import ConflictReport, LayerReport
from gradconflict.measure import metrics


def plain(x):
    values = x.detach().double().tolist()

    def clean(v):
        return [clean(u) for u in v] if isinstance(v, list) else (v if math.isfinite(v) else None)

    return clean(values)


def one_by_one(tasks, G, w, threshold):
    """The quantities of one Gram, each from its own metrics call."""
    mask = metrics.conflict_pairs(G, threshold)
    return {
        "gram": plain(G),
        "task_norms": plain(metrics.task_norms(G)),
        "cosine": plain(metrics.cosine(G)),
        "conflict_pairs": [[tasks[i], tasks[j]] for i, j in mask.nonzero().tolist()],
        "conflict_fraction": plain(metrics.conflict_fraction(G, threshold)),
        "magnitude_similarity": plain(metrics.magnitude_similarity(G)),
        "update_norm": plain(metrics.update_norm(G, w)),
        "cancellation": plain(metrics.cancellation(G, w)),
        "alignment": plain(metrics.alignment(G, w)),
        "condition_number": plain(metrics.condition_number(G)),
        "zero_norm_tasks": [t for t, z in zip(tasks, metrics.zero_norm_tasks(G).tolist()) if z],
    }


def same(a, b):
    """Equal structures; floats equal up to float32 rounding (a batched matmul may round the last bit
    differently)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def test_batched_layer_quantities_equal_each_grams_own():
    g = torch.Generator().manual_seed(0)
    tasks = ("a", "b", "c")
    w = torch.tensor([1.0, 0.5, 2.0])
    layers = {}
    for k in range(7):
        J = torch.randn(3, 5, generator=g)
        if k == 2:
            J[1] = 0  # a zero-norm task on one layer
        if k == 3:
            J[2] = J[0]  # dependent gradients: infinite condition number
        dtype = torch.float64 if k == 4 else torch.float32  # one layer in another precision
        layers[f"l{k}"] = LayerReport(f"l{k}", tasks, (J @ J.T).to(dtype), w, num_params=5, threshold=-0.1 * (k == 5))
    total = sum(layer.gram.double() for layer in layers.values()).float()
    report = ConflictReport(tasks, total, w, losses=torch.ones(3), layers=layers, step=3, threshold=0.0)
    data = report.to_dict()
    json.dumps(data, allow_nan=False)  # strict JSON
    assert same({k: data[k] for k in one_by_one(tasks, total, w, 0.0)}, one_by_one(tasks, total, w, 0.0))
    for name, layer in layers.items():
        expected = {"name": name, "num_params": 5, "route": "", **one_by_one(tasks, layer.gram, w, layer.threshold)}
        assert same(data["layers"][name], expected) and same(layer.to_dict(), expected)
    assert data["layers"]["l3"]["condition_number"] is None and data["layers"]["l2"]["zero_norm_tasks"] == ["b"]
