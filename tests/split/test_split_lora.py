from __future__ import annotations

import pytest
import torch
from torch import nn

from gradconflict.split import LoRALayer, MultiTaskNet, lora_split

from .helpers import MSE, batches, mlp_net


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    adapter = (".down.", ".up.")
    return {k: v.clone() for k, v in model.state_dict().items() if "backbone" in k and not any(a in k for a in adapter)}


def _train(split, steps: int = 5) -> None:
    opt = torch.optim.Adam(split.trainable_parameters(), lr=1e-2)
    for x, y in batches(steps):
        out = split(x)
        loss = sum(MSE[t](out[t], y[t]) for t in out)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fresh_split_computes_the_original_function(net):
    x = batches(1)[0][0]
    expected = net(x)
    split = lora_split(net, rank=2)
    assert split.layer_names == ["model.backbone.0", "model.backbone.2"]
    out = split(x)
    for t in ("a", "b"):
        assert torch.equal(out[t], expected[t])


def test_training_adapters_leaves_base_weights_bit_identical(net):
    split = lora_split(net, rank=2)
    before = _base_state(net)
    assert not any(p.requires_grad for n, p in net.backbone.named_parameters() if ".base." in n)
    _train(split)
    after = _base_state(net)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(split.layers["model.backbone.0"].up[t].abs().sum() > 0 for t in ("a", "b"))  # adapters did train


def test_routing_gives_each_task_only_its_adapter(net):
    x = batches(1)[0][0]
    base = net(x)
    split = lora_split(net, rank=2)
    with torch.no_grad():
        for layer in split.layers.values():
            layer.up["a"].normal_()  # only task a's adapter is non-zero
    assert torch.equal(split(x, task="b"), base["b"])
    assert not torch.allclose(split(x, task="a"), base["a"])
    with split.task("b"):
        assert torch.equal(net(x)["a"], base["a"])  # routed to b: a's head sees the base backbone
    assert torch.equal(net(x)["a"], base["a"])  # outside any task: the base alone
    # gradients: task b's loss reaches only b's adapter
    out = split(x)
    out["b"].sum().backward()
    assert all(p.grad is None for p in split.adapter_parameters("a"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in split.adapter_parameters("b"))


def test_merge_then_unmerge_restores_the_base_exactly(net):
    x = batches(1)[0][0]
    split = lora_split(net, rank=2)
    _train(split)
    before = _base_state(net)
    routed = split(x, task="a")
    split.merge("a")
    assert torch.allclose(net(x)["a"], routed, atol=1e-6)  # merged plain model = routed model
    assert torch.allclose(split(x, task="a"), routed, atol=1e-6)
    with pytest.raises(RuntimeError, match="unmerge"):
        split(x, task="b")
    split.merge("b")  # switching tasks unmerges a first
    split.unmerge()
    after = _base_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(split(x, task="a"), routed)


def test_frozen_backbone_keeps_its_batchnorm_statistics():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
    net = MultiTaskNet(backbone, {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    split = lora_split(net, rank=2)
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "down" not in k and "up" not in k}
    split.train()
    assert split.training and net.heads.training and not backbone[1].training
    _train(split)
    after = backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # running mean, var and count included


def test_default_and_all_targets_skip_what_lora_cannot_wrap():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    net = MultiTaskNet(nn.Sequential(layer, nn.Conv1d(5, 5, 1, groups=5)), {"a": nn.Linear(8, 1)})
    x = torch.randn(2, 5, 8)
    expected = net(x)["a"]
    split = lora_split(net, rank=2, targets="all")
    # out_proj is read directly by the attention, and a grouped conv has no adapter here: both are left alone
    assert split.layer_names == ["model.backbone.0.linear1", "model.backbone.0.linear2"]
    assert torch.allclose(split(x, task="a"), expected, atol=1e-6)


def test_conv_adapter_merges_to_the_same_function():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten())
    net = MultiTaskNet(backbone, {"a": nn.Linear(6 * 4 * 4, 2), "b": nn.Linear(6 * 4 * 4, 1)})
    split = lora_split(net, rank=2, targets=(nn.Conv2d,))
    with torch.no_grad():
        split.layers["model.backbone.0"].up["a"].normal_()
    x = torch.randn(2, 3, 8, 8)
    routed = split(x, task="a")
    split.merge("a")
    assert torch.allclose(net(x)["a"], routed, atol=1e-5)


def test_adapter_state_dict_round_trip(net):
    split = lora_split(net, rank=2)
    _train(split)
    state = split.adapter_state_dict("a")
    assert set(state) == {f"model.backbone.{i}.{p}" for i in (0, 2) for p in ("down", "up")}
    torch.manual_seed(1)
    other = lora_split(mlp_net(), rank=2)
    other.load_adapter_state_dict("a", state)
    assert all(torch.equal(state[k], v) for k, v in other.adapter_state_dict("a").items())
    with pytest.raises(KeyError, match="missing"):
        other.load_adapter_state_dict("a", {})


def test_targets_paths_alpha_and_errors(net):
    split = lora_split(net, ["a"], rank=4, alpha=8.0, targets=["backbone.2"])
    layer = split.layers["model.backbone.2"]
    assert isinstance(layer, LoRALayer) and layer.scale == 2.0 and list(layer.down) == ["a"]
    frozen = [n for n, p in net.backbone.named_parameters() if not p.requires_grad]
    assert frozen == ["0.weight", "0.bias", "2.base.weight", "2.base.bias"]  # the whole backbone, adapted or not
    assert all(p.requires_grad for p in net.heads.parameters())
    with pytest.raises(KeyError, match="unknown task"):
        split(torch.zeros(1, 4), task="b")
    with pytest.raises(ValueError, match="not modules of the backbone"):
        lora_split(mlp_net(), targets=["backbone.9"])
    with pytest.raises(ValueError, match="no layer to adapt"):
        lora_split(mlp_net(), targets=(nn.Conv2d,))
    with pytest.raises(TypeError, match="has no `.backbone`"):
        lora_split(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already carries LoRA"):
        lora_split(net)
    with pytest.raises(ValueError, match="without '.'"):
        lora_split(mlp_net(), ["a.b"])
