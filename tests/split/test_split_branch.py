from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradconflict.split import BranchedNet, MultiTaskNet, branch, duplicated_share
from gradconflict.split.model import count_parameters

from .helpers import MSE, batches, mlp_net


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    out_a, out_b = a(x), b(x)
    return list(out_a) == list(out_b) and all(torch.equal(out_a[t], out_b[t]) for t in out_a)


class Trunk(nn.Module):
    """A backbone that is neither Sequential nor ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.body = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.act(self.stem(x)))


@pytest.mark.parametrize("at", [0, 1, 2, 4, "backbone.2", "backbone.2.weight"])
def test_branching_reproduces_the_shared_model(net, at):
    x = batches(1)[0][0]
    split = branch(net, at=at, groups=[["b"], ["a"]])
    assert isinstance(split, BranchedNet)
    assert _same_outputs(net, split, x)  # same keys, same order, same values
    assert split.groups == {"b": ["b"], "a": ["a"]}


def test_module_list_and_named_blocks():
    torch.manual_seed(0)
    listed = MultiTaskNet(nn.ModuleList([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)]), {"a": nn.Linear(8, 1)})
    x = torch.randn(3, 4)
    assert _same_outputs(listed, branch(listed, at=1), x)
    custom = MultiTaskNet(Trunk(), {"a": nn.Linear(8, 1), "b": nn.Linear(8, 2)})
    paths = ["backbone.stem", "backbone.act", "backbone.body"]
    split = branch(custom, at="backbone.body", groups=[["a", "b"]], blocks=paths, example_input=x)
    assert _same_outputs(custom, split, x) and split.block_paths == paths
    with pytest.raises(TypeError, match="pass blocks="):
        branch(custom, at=1)
    # the model's own forward runs, so a block list that leaves out a step (the ReLU) still computes the backbone
    short = branch(custom, at=1, blocks=["backbone.stem", "backbone.body"], example_input=x)
    assert _same_outputs(custom, short, x)
    with pytest.raises(ValueError, match="not in execution order"):
        branch(custom, at=1, blocks=["backbone.body", "backbone.stem"], example_input=x)


def test_shared_prefix_is_computed_once(net):
    calls = []
    split = branch(net, at=2, groups=[["a"], ["b"]])
    split.stem[0].register_forward_hook(lambda *_: calls.append(1))
    split(torch.zeros(2, 4))
    assert len(calls) == 1 and len(split.stem) == 2


def test_copies_are_independent_of_each_other_and_of_the_original(net):
    x, y = batches(1)[0]
    original = copy.deepcopy(net.state_dict())
    split = branch(net, at=0)  # the full split: one backbone per task
    b_before = split(x)["b"].detach().clone()
    opt = torch.optim.SGD(split.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        MSE["a"](split(x)["a"], y["a"]).backward()
        opt.step()
    out = split(x)
    assert torch.equal(out["b"], b_before)  # training a's copy left b's output alone
    assert not torch.equal(out["a"], net(x)["a"])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in original.items())  # the original is untouched


def test_branches_of_a_partial_split_are_independent_above_a_frozen_stem(net):
    x, y = batches(1)[0]
    split = branch(net, at=2, groups=[["a"], ["b"]])
    for p in split.stem.parameters():
        p.requires_grad_(False)
    b_before = split(x)["b"].detach().clone()
    opt = torch.optim.SGD([p for p in split.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    MSE["a"](split(x)["a"], y["a"]).backward()
    opt.step()
    assert torch.equal(split(x)["b"], b_before)


def test_bad_groups_and_points(net):
    with pytest.raises(ValueError, match="each task once"):
        branch(net, at=1, groups=[["a"]])
    with pytest.raises(ValueError, match="each task once"):
        branch(net, at=1, groups=[["a", "b"], ["b"]])
    with pytest.raises(ValueError, match="outside"):
        branch(net, at=5)
    with pytest.raises(ValueError, match="names no backbone block"):
        branch(net, at="heads.a")
    headless = nn.Module()
    headless.backbone = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="no `.heads`"):
        branch(headless, at=0)
    assert list(branch(mlp_net(tasks=("a", "b", "c")), at=1, groups=[["a", "c"], ["b"]]).branches) == ["a+c", "b"]


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("at", [0, 1, 2, 3, 4, "backbone.2.weight"])
def test_the_duplicated_share_is_what_branch_copies(net, at, groups):
    tasks = [f"t{k}" for k in range(groups)]
    torch.manual_seed(0)
    model = MultiTaskNet(copy.deepcopy(net.backbone), {t: nn.Linear(8, 1) for t in tasks})
    branched = branch(model, at=at, groups=[[t] for t in tasks])
    added = count_parameters(branched) - count_parameters(model)  # counted on the branched model
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert duplicated_share(model, at) == pytest.approx(added / ((groups - 1) * backbone))


def test_the_duplicated_share_counts_tied_weights_and_unnamed_modules_once():
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # tied across the branch point: it stays with the shared stem

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.extra = first, second, nn.Linear(4, 4)

        def forward(self, x):
            return self.extra(self.second(self.first(x)))

    model = MultiTaskNet(Backbone(), {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    blocks = ["backbone.first", "backbone.second"]  # extra is named by no block: copied per group
    branched = branch(model, at=1, blocks=blocks)
    added = count_parameters(branched) - count_parameters(model)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert duplicated_share(model, 1, blocks=blocks) == pytest.approx(added / backbone)
    assert added == 4 + 16 + 4  # second's bias, extra's weight and bias: the tied weight is not copied
