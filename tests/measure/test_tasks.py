"""Task losses and weights by name, checked on the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradconflict.measure.tasks import task_losses


def test_names_are_the_keys_as_strings_and_weights_follow_them():
    x = torch.ones(3, requires_grad=True)
    step = task_losses({2: x.sum(), "b": (x * 2).sum()}, {"2": np.float32(0.5), "b": 3})
    assert step.names == ("2", "b")
    assert step.weight_vector().tolist() == [0.5, 3.0] and step.weight_vector().dtype == torch.float64
    assert step.total().item() == pytest.approx(0.5 * 3 + 3 * 6)


def test_weight_tensors_keep_their_graph_and_host_ones_are_checked_at_once():
    x = torch.ones(2, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    step = task_losses({"a": x.sum()}, {"a": w})
    step.total().backward()
    assert w.grad.item() == 2.0 and x.grad.tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match=">= 0"):
        task_losses({"a": x.sum()}, {"a": torch.tensor(-1.0, requires_grad=True)})
    assert task_losses({"a": x.sum()}, {"a": torch.tensor(4.0)}).weights == [4.0]


def test_losses_are_reshaped_to_scalars():
    x = torch.ones(1, 1, requires_grad=True)
    assert task_losses({"a": x.sum().reshape(1, 1)}).losses[0].shape == ()
