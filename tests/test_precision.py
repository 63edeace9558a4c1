"""The Gram under reduced precision: accumulated in float32 under bf16 autocast, and on CUDA when present."""

from __future__ import annotations

import copy

import pytest
import torch

from gradconflict import ConflictMonitor
from tests.zoo import FAMILIES, losses_of, reference


def test_bf16_autocast_accumulates_the_gram_in_float32():
    model, x = FAMILIES["mlp"](3)
    twin = copy.deepcopy(model).double()
    ref = reference(twin, losses_of(twin(x.double()))).gram
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = losses_of(model(x))
        report = monitor.backward(losses)
    assert report.gram.dtype == torch.float32
    # bf16 forward/backward: about 3 significant digits, and no worse.
    assert float((report.gram.double() - ref).abs().max() / ref.abs().max()) < 5e-2
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer", "embedding_layernorm", "tied_weights"])
def test_cuda_matches_the_float64_oracle(family):
    model, x = FAMILIES[family](4)
    model = model.double().cuda()
    x = x.cuda() if not x.is_floating_point() else x.double().cuda()
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        losses = losses_of(model(x))
        report = monitor.measure(losses)
        ref = reference(model, losses)
    assert report.gram.device.type == "cuda"
    assert float((report.gram - ref.gram).abs().max() / ref.gram.abs().max()) <= 1e-9
