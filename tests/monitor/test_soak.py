"""A week-long run in miniature: 10,000 monitored steps with flat memory (process RSS and live Python objects),
a bounded history and moving averages that cover every step."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn

from gradconflict import ConflictMonitor


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow  # about 9 minutes on 2 loaded cores: `python -m pytest -m slow`
def test_ten_thousand_monitored_steps_keep_memory_flat():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    model = nn.ModuleDict({"backbone": backbone, "heads": heads})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 4)
    marks = {}
    with ConflictMonitor(model, max_history=1000) as monitor:
        for step in range(10_000):
            h = backbone(x)
            monitor.backward({"a": (heads["a"](h) - 1).pow(2).mean(), "b": (heads["b"](h) + 1).pow(2).mean()})
            optimizer.step()
            optimizer.zero_grad()
            if step in (1_999, 9_999):
                gc.collect()
                marks[step] = (rss_mib(), len(gc.get_objects()))
        assert len(monitor.history) == 1000 and monitor.history.steps_seen == 10_000
        assert monitor.history[0].step == 9_000
        assert all(math.isfinite(v) for v in monitor.history.ema.values())
    (rss_early, objects_early), (rss_late, objects_late) = marks[1_999], marks[9_999]
    assert rss_late - rss_early < 16, marks  # MiB, over 8,000 steps
    assert objects_late - objects_early < 500, marks
