from __future__ import annotations

import pytest
import torch
from torch import nn

from gradconflict.split import LoRALayer, MultiTaskNet, lora_split

from .helpers import MSE, batches, mlp_net


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    adapter = (".down.", ".up.")
    return {k: v.clone() for k, v in model.state_dict().items() if "backbone" in k and not any(a in k for a in adapter)}


class FirstToken(nn.Module):
    """A head on a sequence's first position."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, 0])


def encoder_net() -> MultiTaskNet:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return MultiTaskNet(encoder, {"a": FirstToken(8), "b": FirstToken(8)})


def conv_net() -> MultiTaskNet:
    backbone = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2, padding_mode="reflect"), nn.ReLU(),  # grouped and reflect-padded
        nn.Flatten(), nn.Linear(6 * 4 * 4, 8),
    )
    return MultiTaskNet(backbone, {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})


MODELS = {
    "mlp": (lambda: mlp_net(), lambda g: torch.randn(5, 4, generator=g)),
    "encoder": (encoder_net, lambda g: torch.randn(5, 6, 8, generator=g)),
    "conv": (conv_net, lambda g: torch.randn(5, 3, 4, 4, generator=g)),
}


def _outputs(model: nn.Module, x: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """The model's outputs in train mode, or in eval mode under no_grad (where the encoder takes torch's fast path)."""
    model.train(mode == "train")
    for module in model.modules():  # a split keeps the frozen backbone's statistics: compare with them held too
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    if mode == "train":
        return {t: v.detach() for t, v in model(x).items()}
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_layer_kind_splits_exactly_trains_adapters_only_and_routes_each_task(kind, mode):
    make, draw = MODELS[kind]
    torch.manual_seed(0)
    net = make()
    x = draw(torch.Generator().manual_seed(1))
    expected = _outputs(net, x, mode)
    split = lora_split(net, rank=2, targets="all")
    if kind == "encoder":  # the attention's input projection and out_proj are adapted, and .weight stays a tensor
        assert "model.backbone.layers.0.self_attn.in_proj_weight" in split.layer_names
        assert "model.backbone.layers.0.self_attn.out_proj.weight" in split.layer_names
        assert isinstance(net.backbone.layers[0].self_attn.out_proj.weight, torch.Tensor)
    if kind == "conv":
        assert "model.backbone.3.weight" in split.layer_names  # grouped, reflect-padded
    fresh = _outputs(split, x, mode)
    assert all(torch.equal(fresh[t], expected[t]) for t in expected)  # the adapters start at zero

    # only the adapters (and the heads) train: every other backbone entry, buffers included, stays as it was
    adapters = {id(p) for p in split.adapter_parameters()}
    assert {id(p) for p in net.backbone.parameters() if p.requires_grad} == adapters
    before = _base_state(net)
    split.train()
    opt = torch.optim.SGD(split.trainable_parameters(), lr=0.1)
    for _ in range(3):
        out = split(x)
        opt.zero_grad()
        sum((out[t] - i).pow(2).mean() for i, t in enumerate(out)).backward()
        opt.step()
    after = _base_state(net)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(any(layer.up[t].abs().sum() > 0 for layer in split.layers.values()) for t in ("a", "b"))

    # each task's adapter changes only its task's output
    with torch.no_grad():
        for layer in split.layers.values():
            layer.up["b"].zero_()
    base = {t: v for t, v in _outputs(net, x, mode).items()}  # outside any task: the base backbone
    routed = _outputs(split, x, mode)
    assert torch.equal(routed["b"], base["b"]) and not torch.allclose(routed["a"], base["a"])


def _train(split, steps: int = 5) -> None:
    opt = torch.optim.Adam(split.trainable_parameters(), lr=1e-2)
    for x, y in batches(steps):
        out = split(x)
        loss = sum(MSE[t](out[t], y[t]) for t in out)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_training_adapters_leaves_base_weights_bit_identical(net):
    split = lora_split(net, rank=2)
    before = _base_state(net)
    assert split.layer_names == ["model.backbone.0.weight", "model.backbone.2.weight"]
    assert not any(p.requires_grad for n, p in net.backbone.named_parameters() if ".original" in n)
    _train(split)
    after = _base_state(net)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(split.layers["model.backbone.0.weight"].up[t].abs().sum() > 0 for t in ("a", "b"))  # adapters did train


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


def test_default_targets_are_the_linear_maps_and_all_adds_convolutions_and_embeddings():
    def net():
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
        backbone = nn.Sequential(nn.Embedding(10, 8), layer, nn.Conv1d(5, 5, 1, groups=5), nn.LayerNorm(8))
        return MultiTaskNet(backbone, {"a": nn.Linear(8, 1)})

    attention = ["0.self_attn.in_proj_weight", "0.self_attn.out_proj.weight", "0.linear1.weight", "0.linear2.weight"]
    split = lora_split(net(), rank=2)
    assert split.layer_names == [f"model.backbone.1.{n[2:]}" for n in attention]
    split = lora_split(net(), rank=2, targets="all")
    assert split.layer_names == ["model.backbone.0.weight"] + [f"model.backbone.1.{n[2:]}" for n in attention] + [
        "model.backbone.2.weight"
    ]  # the LayerNorm's weight is a vector, no matrix to adapt


def test_separate_attention_projections_are_adapted_each():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, inputs):
            q, k, v = inputs
            return self.attention(q, k, v, need_weights=False)[0]

    net = MultiTaskNet(Attend(), {"a": FirstToken(8)})
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    expected = net((q, k, v))["a"]
    split = lora_split(net, rank=2)
    names = [n.rsplit(".", 1)[-1] for n in split.layer_names]
    assert names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "weight"]
    assert torch.equal(split((q, k, v), task="a"), expected)


def test_conv_adapter_merges_to_the_same_function():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten())
    net = MultiTaskNet(backbone, {"a": nn.Linear(6 * 4 * 4, 2), "b": nn.Linear(6 * 4 * 4, 1)})
    split = lora_split(net, rank=2, targets=(nn.Conv2d,))
    with torch.no_grad():
        split.layers["model.backbone.0.weight"].up["a"].normal_()
    x = torch.randn(2, 3, 8, 8)
    routed = split(x, task="a")
    split.merge("a")
    assert torch.allclose(net(x)["a"], routed, atol=1e-5)


def test_adapter_state_dict_round_trip(net):
    split = lora_split(net, rank=2)
    _train(split)
    state = split.adapter_state_dict("a")
    assert set(state) == {f"model.backbone.{i}.weight.{p}" for i in (0, 2) for p in ("down", "up")}
    torch.manual_seed(1)
    other = lora_split(mlp_net(), rank=2)
    other.load_adapter_state_dict("a", state)
    assert all(torch.equal(state[k], v) for k, v in other.adapter_state_dict("a").items())
    with pytest.raises(KeyError, match="missing"):
        other.load_adapter_state_dict("a", {})


def test_targets_paths_alpha_and_errors(net):
    split = lora_split(net, ["a"], rank=4, alpha=8.0, targets=["backbone.2"])
    layer = split.layers["model.backbone.2.weight"]
    assert isinstance(layer, LoRALayer) and layer.scale == 2.0 and list(layer.down) == ["a"]
    frozen = [n for n, p in net.backbone.named_parameters() if not p.requires_grad]
    assert frozen == ["0.weight", "0.bias", "2.bias", "2.parametrizations.weight.original"]  # adapted or not
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
