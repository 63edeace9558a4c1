"""Fixtures of the split tests."""

from __future__ import annotations

import pytest
import torch

from gradconflict.split import MultiTaskNet

from .helpers import mlp_net


@pytest.fixture
def net() -> MultiTaskNet:
    torch.manual_seed(0)
    return mlp_net()
