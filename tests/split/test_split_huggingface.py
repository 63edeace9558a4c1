"""The split toolkit on Hugging Face backbones built from configs (no download): BERT, GPT-2 and ViT. Their layers
take masks and return tuples; branch, lora_split and compare run the model's own forward, so both pass through."""

from __future__ import annotations

import ast
import copy
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from gradconflict import ConflictMonitor  # noqa: E402
from gradconflict.split import BranchedNet, branch, compare, duplicated_share, lora_split  # noqa: E402
from gradconflict.split.lora import LoRALayer  # noqa: E402
from gradconflict.split.model import backbone_blocks, count_parameters  # noqa: E402

WIDTH = 16


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=40, n_embd=WIDTH, n_layer=3, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2Model(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTModel(config, add_pooling_layer=False)


class TwoTasks(nn.Module):
    """The convention on a Hugging Face backbone: ``forward(batch)`` passes the batch (ids and attention mask, or
    pixels) to the backbone and reads one token's features."""

    def __init__(self, make_backbone) -> None:
        super().__init__()
        self.backbone = make_backbone()
        self.heads = nn.ModuleDict({"a": nn.Linear(WIDTH, 1), "b": nn.Linear(WIDTH, 1)})

    def forward(self, batch):
        hidden = self.backbone(**batch).last_hidden_state[:, 0]
        return {t: head(hidden) for t, head in self.heads.items()}


FAMILIES = {"bert": bert, "gpt2": gpt2, "vit": vit}
# the paths of each family's stack of layers, and the path of its second layer
LAYERS = {"bert": "backbone.encoder.layer", "gpt2": "backbone.h", "vit": "backbone.layers"}
FIRST = {"bert": "backbone.embeddings", "gpt2": "backbone.wte", "vit": "backbone.embeddings"}


def model_and_batch(family: str, seed: int = 0, n: int = 6):
    torch.manual_seed(seed)
    model = TwoTasks(FAMILIES[family])
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        batch = {"pixel_values": torch.randn(n, 3, 8, 8, generator=g)}
    else:
        mask = torch.ones(n, 10, dtype=torch.long)
        mask[::2, 6:] = 0  # padded rows: the mask must reach every layer's attention
        batch = {"input_ids": torch.randint(1, 40, (n, 10), generator=g), "attention_mask": mask}
    return model, batch


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_blocks_are_found_around_the_stack_of_layers(family):
    model, _ = model_and_batch(family)
    paths = [p for p, _ in backbone_blocks(model)]
    layers = [f"{LAYERS[family]}.{i}" for i in range(3)]
    assert paths[0] == FIRST[family]
    start = paths.index(layers[0])
    assert paths[start : start + 3] == layers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_branching_at_an_encoder_layer_is_exact_and_runs_the_stem_once(family):
    model, batch = model_and_batch(family)
    at = f"{LAYERS[family]}.1"
    split = branch(model, at=at, groups=[["a"], ["b"]], example_input=batch)
    assert isinstance(split, BranchedNet) and len(split.stem) == [p for p, _ in backbone_blocks(model)].index(at)
    calls = []
    split.stem[0].register_forward_hook(lambda *_: calls.append(1))
    out, expected = split(batch), model(batch)
    assert calls == [1]  # the shared embeddings computed once for both groups
    for t in expected:
        torch.testing.assert_close(out[t], expected[t], rtol=1e-5, atol=1e-6)

    # gradients at the moment of the split: the stem receives both tasks' gradients, as in the shared model; each
    # group's copy of the upper layers receives its own task's only, the gradient the shared layers got from it
    sum(v.sum() for v in split(batch).values()).backward()
    sum(v.sum() for v in model(batch).values()).backward()
    for (name, p), q in zip(split.stem.named_parameters(), _stem_params(model, split)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    twin, _ = model_and_batch(family)
    twin(batch)["a"].sum().backward()
    upper_a = split.branches["a"].get_submodule(at)
    for (name, p), q in zip(upper_a.named_parameters(), twin.get_submodule(at).parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_branched_model_copies_saves_and_inspects_like_a_module(tmp_path):
    model, batch = model_and_batch("bert")
    split = branch(model, at="backbone.encoder.layer.1", groups=[["a"], ["b"]])
    shared_layer = split.branches["b"].get_submodule("backbone.encoder.layer.0")
    assert shared_layer.attention is split.stem[1].attention  # attributes read through to the block
    assert shared_layer.block is split.stem[1] and shared_layer is split.branches["a"].backbone.encoder.layer[0]
    twin = copy.deepcopy(split)
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin(batch)["a"].sum().backward()
    opt.step()
    assert not torch.equal(twin(batch)["b"], split(batch)["b"])  # the copy's stem moved, the original's did not
    assert twin.branches["b"].backbone.encoder.layer[0].block is twin.stem[1]  # the copy shares its own stem
    torch.save(split.state_dict(), tmp_path / "split.pt")
    again = branch(model, at="backbone.encoder.layer.1", groups=[["a"], ["b"]])
    again.load_state_dict(torch.load(tmp_path / "split.pt"))
    torch.testing.assert_close(again(batch)["a"], split(batch)["a"])


def _stem_params(model: nn.Module, split: BranchedNet) -> list[nn.Parameter]:
    return [p for path in split.block_paths[: len(split.stem)] for p in model.get_submodule(path).parameters()]


def test_keyword_arguments_reach_every_group():
    model, batch = model_and_batch("bert")

    class Keywords(TwoTasks):
        def forward(self, input_ids, attention_mask=None):
            return super().forward({"input_ids": input_ids, "attention_mask": attention_mask})

    keyed = Keywords(bert)
    keyed.load_state_dict(model.state_dict())
    split = branch(keyed, at="backbone.encoder.layer.2")
    out = split(batch["input_ids"], attention_mask=batch["attention_mask"])
    unmasked = split(batch["input_ids"])
    assert not torch.allclose(out["a"], unmasked["a"])  # the mask reached the layers
    torch.testing.assert_close(out["b"], model(batch)["b"], rtol=1e-5, atol=1e-6)
    lora = lora_split(copy.deepcopy(keyed), rank=2)
    torch.testing.assert_close(lora(batch["input_ids"], attention_mask=batch["attention_mask"])["a"], out["a"],
                               rtol=1e-5, atol=1e-6)


def test_the_advices_layer_name_branches_at_its_block():
    model, batch = model_and_batch("bert")
    full = branch(model, at="backbone.embeddings.word_embeddings")  # the name the advice's next_step passes
    assert len(full.stem) == 0 and sorted(full.branches) == ["a", "b"]
    torch.testing.assert_close(full(batch)["a"], model(batch)["a"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_duplicated_share_is_what_branch_copies(family):
    model, _ = model_and_batch(family)
    at = f"{LAYERS[family]}.1.attention" if family != "gpt2" else f"{LAYERS[family]}.1.attn"  # a layer's path
    added = count_parameters(branch(model, at=at)) - count_parameters(model)  # two groups: one more copy
    assert duplicated_share(model, at) == pytest.approx(added / sum(p.numel() for p in model.backbone.parameters()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_split_adapts_linear_and_gpt2_conv1d_layers(family):
    model, batch = model_and_batch(family)
    before = {t: v.detach() for t, v in model(batch).items()}
    split = lora_split(model, rank=2, targets="all")
    assert {layer.transposed for layer in split.layers.values()} == ({True, False} if family == "gpt2" else {False})
    out = split(batch)
    assert all(torch.equal(out[t], before[t]) for t in before)  # adapters start at zero: the same function
    adapters = {id(p) for p in split.adapter_parameters()}
    assert {id(p) for p in model.backbone.parameters() if p.requires_grad} == adapters  # all else is frozen
    frozen = {k: v.clone() for k, v in model.backbone.named_parameters() if not v.requires_grad}
    opt = torch.optim.Adam(split.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sum(v.pow(2).mean() for v in split(batch).values()).backward()
        opt.step()
    assert all(torch.equal(v, model.backbone.get_parameter(k)) for k, v in frozen.items())  # base untouched
    with torch.no_grad():  # each task's adapter changes only its task's output
        for layer in split.layers.values():
            layer.up["b"].zero_()
        base, routed = model(batch), split(batch)
    assert torch.equal(routed["b"], base["b"]) and not torch.allclose(routed["a"], base["a"])
    routed_a = split(batch, task="a")
    split.merge("a")  # the adapter folded into the base weight (transposed for Conv1D) computes the same
    torch.testing.assert_close(model(batch)["a"], routed_a, rtol=1e-4, atol=1e-5)
    split.unmerge()
    assert all(torch.equal(v, model.backbone.get_parameter(k)) for k, v in frozen.items())
    assert all(isinstance(m, LoRALayer) for m in split.layers.values())


def test_compare_runs_the_advices_own_next_step_on_bert():
    """Two aligned tasks: the advice keeps the backbone shared and its next step checks that against independent
    models and copies branching at BERT's blocks; compare runs that step's arguments as they are, on BERT."""
    model, batch = model_and_batch("bert", n=16)
    target = batch["input_ids"][:, :1].float() / 40
    targets = {"a": target, "b": 2 * target}
    losses = {t: nn.functional.mse_loss for t in targets}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        for _ in range(6):
            out = model(batch)
            monitor.backward({t: losses[t](out[t], targets[t]) for t in targets})
            opt.step()
            opt.zero_grad()
    advice = monitor.advise()
    found = re.search(r"variants=(.*?),\s*branch_at=(\[.*?\]), groups=(.*?),\n", advice.next_step, flags=re.S)
    variants, points, groups = (ast.literal_eval(found.group(k)) for k in (1, 2, 3))
    assert advice.verdict == "keep_shared" and variants == ("shared", "independent", "branched")
    # The blocks that branch() copies, from the bottom up: the embeddings, then the encoder's layers.
    assert points[0] == "backbone.embeddings" and len(points) > 1
    assert all(p.startswith("backbone.encoder.layer.") for p in points[1:]), points

    def factory():
        return model_and_batch("bert")[0]

    data = [(batch, targets)]
    result = compare(factory, losses, data, steps=4, variants=variants, branch_at=points, groups=groups,
                     progress=False, evals=1)
    assert list(result.variants) == ["shared", "independent", *(f"branched@{p}" for p in points)]
    assert all(len(result.history["independent"][t]) == 4 for t in targets)
