"""A monitor's state for a resumed run: loaded with ``torch.load(weights_only=True)``, and checked field by field
before any is applied."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from gradconflict import ConflictMonitor
from tests.zoo import FAMILIES, MultiTask, linear_heads, losses_of


def _corrupt(state: dict, field: str, value: object) -> dict:
    state = dict(state)
    if value is KeyError:
        del state[field]
    else:
        state[field] = value
    return state


@pytest.mark.parametrize(
    "field, value",
    [
        ("step", KeyError),
        ("step", "12"),
        ("step", -1),
        ("shared", "backbone.0.weight"),
        ("shared", ["not.a.parameter"]),
        ("history", KeyError),
        ("history", {"schema": 1}),
        ("history", [1, 2]),
        ("weighting", "upgrad"),
        ("weighting", {"method": "upgrad", "last": {"t0": "x"}}),
        ("strategy_choices", [{"tasks": 2}]),
        ("strategy_choices", "batched"),
    ],
)
def test_a_malformed_state_names_its_field_and_changes_nothing(field, value):
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model) as source:
        for _ in range(3):
            source.backward(losses_of(model(x)), weighting="upgrad")
        saved = source.state_dict()
    with ConflictMonitor(model) as monitor:
        for _ in range(2):
            monitor.backward(losses_of(model(x)))
        before = (monitor.step, monitor.shared_parameters, len(monitor.history), monitor.plan["choices"])
        with pytest.raises(ValueError, match=repr(field)):
            monitor.load_state_dict(_corrupt(saved, field, value))
        assert (monitor.step, monitor.shared_parameters, len(monitor.history), monitor.plan["choices"]) == before
        monitor.load_state_dict(saved)  # and the state itself loads
        assert monitor.step == 3 and len(monitor.history) == 3


def test_a_state_that_is_not_a_dict_is_refused():
    model, _ = FAMILIES["mlp"](2)
    with ConflictMonitor(model) as monitor, pytest.raises(ValueError):
        monitor.load_state_dict([("step", 1)])


def test_the_state_round_trips_through_torch_load_with_weights_only():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model) as monitor:
        for _ in range(2):
            monitor.backward(losses_of(model(x)), weighting="upgrad")
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "monitor": monitor.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = MultiTask(copy.deepcopy(model.backbone), linear_heads(12, 2))
    fresh.load_state_dict(loaded["model"])
    with ConflictMonitor(fresh) as resumed:
        resumed.load_state_dict(loaded["monitor"])
        assert resumed.step == 2 and len(resumed.history) == 2
