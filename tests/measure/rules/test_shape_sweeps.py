"""Each layer rule over drawn shapes and options (batch, sequence, channel and spatial sizes, groups, stride,
dilation, padding and padding modes, bias on and off, train and eval mode), measured end to end by the batched
pass: the Gram and the layer's Gram equal the float64 oracle (T separate ``autograd.grad`` calls), and the layer was
covered by its rule (route ``ghost`` or ``materialised``, never ``autograd``) in a batched step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from gradconflict import ConflictMonitor

pytestmark = pytest.mark.usefixtures("float64_default")

SWEEP = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)
RTOL = 1e-9


def check(layer: nn.Module, x: torch.Tensor, tasks: int) -> None:
    """``layer`` as the shared backbone of ``tasks`` linear heads on its flattened output."""
    torch.manual_seed(0)
    features = layer(x).flatten(1).shape[1]
    backbone = nn.Sequential(layer, nn.Flatten())
    heads = nn.ModuleList(nn.Linear(features, 1) for _ in range(tasks))
    model = nn.ModuleDict({"backbone": backbone, "heads": heads})

    def losses() -> dict[str, torch.Tensor]:
        h = backbone(x)
        return {f"t{k}": ((head(h) - k) ** 2).mean() * (k + 1) + head(h).sin().mean() for k, head in enumerate(heads)}

    with ConflictMonitor(model, shared=backbone, strategy="batched") as monitor:
        step = losses()
        report = monitor.measure(step)
    shared = [p for p in layer.parameters() if p.requires_grad]
    J = torch.stack([
        torch.cat([g.to_dense().flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in step.values()
    ])
    expected = J @ J.T
    scale = float(expected.abs().max()) + 1e-12  # (a LayerNorm over one value has gradient 0 up to rounding)
    assert report.strategy == "batched"
    assert float((report.gram - expected).abs().max()) <= RTOL * scale
    (entry,) = report.layers.values()
    assert float((entry.gram - expected).abs().max()) <= RTOL * scale
    assert entry.route in ("ghost", "materialised")


@SWEEP
@given(
    batch=st.integers(1, 4), seq=st.integers(0, 3), d_in=st.integers(1, 6), d_out=st.integers(1, 6),
    bias=st.booleans(), tasks=st.integers(1, 4),
)
def test_linear(batch, seq, d_in, d_out, bias, tasks):
    shape = (batch, d_in) if seq == 0 else (batch, seq, d_in)
    check(nn.Linear(d_in, d_out, bias=bias), torch.randn(shape), tasks)


@st.composite
def conv_cases(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    in_channels, out_channels = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from([0, 1, 2, "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    size = draw(st.integers(3, 6 if dims < 3 else 4))
    if mode == "reflect" and isinstance(padding, int):
        assume(padding < size)
    span = dilation * (kernel - 1) + 1
    padded = size + (2 * padding if isinstance(padding, int) else span - 1 if padding == "same" else 0)
    assume(padded >= span)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](
        in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=draw(st.booleans()), padding_mode=mode,
    )
    x = torch.randn(draw(st.integers(1, 3)), in_channels, *([size] * dims))
    return conv, x, draw(st.integers(1, 3))


@SWEEP
@given(case=conv_cases())
def test_conv(case):
    conv, x, tasks = case
    check(conv, x, tasks)


@SWEEP
@given(
    num=st.integers(2, 8), dim=st.integers(1, 4), batch=st.integers(1, 3), seq=st.integers(1, 5),
    padding=st.booleans(), by_freq=st.booleans(), sparse=st.booleans(), tasks=st.integers(1, 3),
)
def test_embedding(num, dim, batch, seq, padding, by_freq, sparse, tasks):
    assume(not (sparse and by_freq))  # torch has no sparse gradient scaled by frequency
    emb = nn.Embedding(num, dim, padding_idx=0 if padding else None, scale_grad_by_freq=by_freq, sparse=sparse)
    ids = torch.randint(0, num, (batch, seq))
    assume(not padding or bool((ids != 0).any()))  # at least one row that receives gradient
    check(emb, ids, tasks)


@st.composite
def norm_cases(draw):
    kind = draw(st.sampled_from(["layer", "rms", "group", "batch1d", "batch2d"]))
    batch, channels, length = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    affine_bias = draw(st.booleans())
    if kind == "layer":
        trailing = draw(st.integers(1, 2))
        x = torch.randn(batch, channels, length)
        layer: nn.Module = nn.LayerNorm(list(x.shape[-trailing:]), bias=affine_bias)
    elif kind == "rms":
        x = torch.randn(batch, channels, length)
        layer = nn.RMSNorm(length)
    elif kind == "group":
        groups = draw(st.integers(1, 2))
        x = torch.randn(batch, groups * channels, length)
        layer = nn.GroupNorm(groups, groups * channels)
    else:
        spatial = (length,) if kind == "batch1d" else (length, draw(st.integers(1, 3)))
        x = torch.randn(batch, channels, *spatial)
        layer = (nn.BatchNorm1d if kind == "batch1d" else nn.BatchNorm2d)(channels)
        if draw(st.booleans()):
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
            layer.eval()
        else:
            assume(x.numel() // channels > 1)  # batch statistics need two values per channel
    return layer, x, draw(st.integers(1, 3))


@SWEEP
@given(case=norm_cases())
def test_norm(case):
    layer, x, tasks = case
    check(layer, x, tasks)
