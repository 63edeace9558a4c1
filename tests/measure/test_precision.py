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


@pytest.mark.cuda
@cuda
def test_cuda_history_collects_without_waiting_and_matches_the_report():
    model, x = FAMILIES["mlp"](3)
    model, x = model.cuda(), x.cuda()
    with ConflictMonitor(model, on_nonfinite="propagate") as monitor:
        reports = [monitor.backward(losses_of(model(x))) for _ in range(3)]
        kept = monitor.history[-1]
    assert kept.gram.device.type == "cpu"
    torch.testing.assert_close(kept.gram, reports[-1].gram.cpu())


@pytest.mark.cuda
@cuda
def test_cuda_fp16_grad_scaler_writes_the_plain_loops_grad():
    model, x = FAMILIES["mlp"](3)
    model, x = model.cuda(), x.cuda()
    twin = copy.deepcopy(model)
    scaler, twin_scaler = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    with ConflictMonitor(model, scaler=scaler) as monitor:
        with torch.autocast("cuda", dtype=torch.float16):
            losses = losses_of(model(x))
        report = monitor.backward({t: loss.float() for t, loss in losses.items()})
    with torch.autocast("cuda", dtype=torch.float16):
        losses = losses_of(twin(x))
    twin_scaler.scale(sum(loss.float() for loss in losses.values())).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert report.gram.dtype == torch.float32 and not report.skipped


@pytest.mark.cuda
@cuda
def test_cuda_weight_tensors_are_checked_at_measured_steps():
    model, x = FAMILIES["mlp"](2)
    model, x = model.cuda(), x.cuda()
    with ConflictMonitor(model) as monitor, pytest.raises(ValueError, match="negative or not finite"):
        monitor.backward(losses_of(model(x)), weights={"t0": torch.tensor(-1.0, device="cuda")})
    assert all(p.grad is None for p in model.parameters())
