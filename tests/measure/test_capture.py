"""The taps: on the module's own output, keyword calls, nothing on the model, only when armed."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from gradconflict.measure.capture import Capture
from gradconflict.measure.graph import walk_graph


def test_taps_only_when_armed_and_leave_nothing_behind():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    capture = Capture(model)
    assert not walk_graph([model(torch.ones(1, 2)).sum()]).calls
    capture.arm(True)
    calls = walk_graph([model(torch.ones(1, 2)).sum()]).calls
    assert [c.module for c in calls] == [model[2], model[0]]
    capture.close()
    assert not nn_module._has_any_global_hook()
    assert all(not m._forward_hooks for m in model.modules())


def test_keyword_calls_and_restriction_to_shared_modules():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    capture = Capture(nn.ModuleList([a, b]))
    capture.restrict({id(a.weight)})
    capture.arm(True)
    y = b(input=a(input=torch.ones(1, 2)))
    calls = walk_graph([y.sum()]).calls
    assert [c.module for c in calls] == [a] and torch.equal(calls[0].saved, torch.ones(1, 2))
    capture.close()


def test_the_tap_sits_under_hooks_that_rewrite_the_output():
    layer = nn.Linear(2, 2)
    layer.register_forward_hook(lambda m, args, out: out * 3)
    capture = Capture(layer)
    capture.arm(True)
    y = layer(torch.ones(1, 2))
    node = y.grad_fn  # the user's "* 3" is applied after the tap
    assert type(node).__name__ == "MulBackward0"
    assert type(node.next_functions[0][0]).__name__ == "_TapBackward"
    capture.close()
