"""Per-sample attribution against a float64 oracle of per-example gradients.

The oracle gives every example its own copy of the shared parameters (``torch.func.functional_call`` on one
example at a time), runs the batch's loss on the concatenated outputs and takes ``torch.autograd.grad`` of each
task's loss with respect to each example's copy: that is ``g_i^(n)`` by definition, whatever the reduction or
mask, with no code of the library's.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor, nn

from gradconflict import ConflictMonitor
from tests.zoo import FAMILIES, MultiTask, linear_heads, losses_of

RTOL = 1e-9

Losses = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def per_example_oracle(model: nn.Module, x: Tensor, losses: Losses, names: list[str]) -> tuple[Tensor, Tensor]:
    """``(contribution, within)``, each ``[N, T, T]``, over the parameters ``names``, in float64."""
    params = dict(model.named_parameters())
    N = x.shape[0]
    copies = [{n: params[n].detach().clone().requires_grad_() for n in names} for _ in range(N)]
    outputs = [torch.func.functional_call(model, {**params, **copies[n]}, (x[n : n + 1],)) for n in range(N)]
    batch = {t: torch.cat([o[t] for o in outputs]) for t in outputs[0]}
    leaves = [c[name] for c in copies for name in names]
    rows = []
    for loss in losses(batch).values():
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True, materialize_grads=True)
        rows.append(torch.stack([torch.cat([g.flatten() for g in grads[n * len(names) : (n + 1) * len(names)]])
                                 for n in range(N)]))
    J = torch.stack(rows)  # [T, N, P]
    return einsum(J, J.sum(1), "t n p, s p -> n t s"), einsum(J, J, "t n p, s n p -> n t s")


def attributed(model: nn.Module, x: Tensor, losses: Losses, ids: Tensor | None = None):
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        report = monitor.measure(losses(model(x)), sample_ids=torch.arange(x.shape[0]) if ids is None else ids)
    return report


@pytest.fixture(params=["batched", "loop"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Attributed steps forced onto the batched pass or onto the per-task loop with taps (measured steps keep
    the automatic choice); every attributed report is checked to have taken it."""
    tapped = importlib.import_module("gradconflict.measure.engine.tapped")
    choose = tapped.TappedEngine._choose

    def forced(self, graph, plan, stacked, reduction, attributed=False):
        return (request.param, None) if attributed else choose(self, graph, plan, stacked, reduction)

    monkeypatch.setattr(tapped.TappedEngine, "_choose", forced)
    attribute = tapped.TappedEngine.attribute

    def checked(self, *args, **kwargs):
        measurement = attribute(self, *args, **kwargs)
        assert measurement.strategy == request.param
        return measurement

    monkeypatch.setattr(tapped.TappedEngine, "attribute", checked)
    return request.param


def check_against_oracle(model: nn.Module, x: Tensor, losses: Losses = losses_of, complete: bool = True):
    report = attributed(model, x, losses)
    samples = report.samples
    assert samples is not None
    if complete:
        assert samples.omitted == {}
        assert sorted(samples.parameters) == sorted(n for n, _ in model.named_parameters() if n.startswith("backbone"))
        assert rel_err(samples.gram, report.gram) <= RTOL
    contribution, within = per_example_oracle(model, x, losses, samples.parameters)
    assert rel_err(samples.contribution, contribution) <= RTOL
    assert rel_err(samples.within, within) <= RTOL
    norms = within.diagonal(dim1=1, dim2=2).sqrt()
    assert torch.allclose(samples.cosine, within / (norms[:, :, None] * norms[:, None, :]), rtol=1e-7, atol=1e-9)
    assert samples.residual <= RTOL
    return samples


pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize(
    "family", ["mlp", "wide_mlp", "conv1d_3d", "embedding_layernorm", "reused_module", "deep_heads"]
)
def test_zoo_matches_per_example_oracle(family: str, route: str):
    model, x = FAMILIES[family](3)
    check_against_oracle(model, x)


def test_a_task_that_skips_a_layer_has_zero_there(route: str):
    # Task t1 reads the first layer's output only: on the per-task loop its pass never reaches the second layer's
    # tap, which then holds zeros for it, as the batched pass's gradient does.
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 6)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h), h

    class Pick(nn.Module):
        def __init__(self, index: int):
            super().__init__()
            self.index = index

        def forward(self, outputs):
            return outputs[self.index]

    heads = {f"t{i}": nn.Sequential(Pick(i), nn.Linear(6, 1)) for i in range(2)}
    check_against_oracle(MultiTask(Split(), heads), torch.randn(5, 4))


def test_auto_times_the_attributed_steps_apart_and_keeps_the_faster():
    # Both routes of an attributed step are timed on its first attributed steps, apart from the measured steps'
    # choice; every one of them is exact, and a loop beyond its memory budget is no candidate.
    model, x = FAMILIES["cnn"](3)
    model.eval()
    ids = torch.arange(x.shape[0])
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        measured = monitor.measure(losses_of(model(x)))
        reports = [monitor.measure(losses_of(model(x)), sample_ids=ids) for _ in range(5)]
        choices = {c["attributed"]: c for c in monitor.plan["choices"]}
    assert measured.strategy == "batched" and choices[False]["runs"] == {"batched": 1}
    assert [r.strategy for r in reports[:4]] == ["batched", "loop", "batched", "loop"]
    assert choices[True]["runs"] == {"batched": 2, "loop": 2}
    seconds = choices[True]["seconds"]
    assert reports[4].strategy == choices[True]["strategy"] == min(seconds, key=seconds.get)
    contribution, within = per_example_oracle(model, x, losses_of, reports[0].samples.parameters)
    for r in reports:
        assert rel_err(r.samples.contribution, contribution) <= RTOL and rel_err(r.samples.within, within) <= RTOL
    with ConflictMonitor(model, shared=model.backbone, loop_memory=0) as monitor:
        assert {monitor.measure(losses_of(model(x)), sample_ids=ids).strategy for _ in range(3)} == {"batched"}


def test_cnn_with_eval_batchnorm_matches_oracle(route: str):
    # BatchNorm in training mode normalises with the batch's statistics, so no example has a gradient of its
    # own there; with running statistics the examples are independent and the oracle applies.
    model, x = FAMILIES["cnn"](3)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    check_against_oracle(model, x)


def test_both_linear_routes_match_oracle(route: str):
    # Many rows and narrow layers take the materialised route; few rows and wide layers the kernel route.
    for rows, width in [(40, 4), (3, 40)]:
        bb = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 6))
        model, x = MultiTask(bb, linear_heads(6, 2)), torch.randn(rows, 2, width)  # two rows per example
        check_against_oracle(model, x, lambda out: {t: (o ** 2).mean() for t, o in out.items()})


LINEAR_ROUTES = ["ghost", "materialised", "per-example", "per-example, formed twice"]


def _over_budget_if_asked(route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """For the route "per-example, formed twice": a memory budget of one byte, so that each example's weight
    gradients are formed a piece at a time and formed again for the contributions."""
    if route == "per-example, formed twice":
        base = importlib.import_module("gradconflict.measure.rules.base")
        monkeypatch.setattr(base, "EXAMPLE_CHUNK_BYTES", 1)
        monkeypatch.setattr(base, "PIECE_BYTES", 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("route", LINEAR_ROUTES)
def test_linear_routes_match_oracle(route: str, reduction: str, monkeypatch: pytest.MonkeyPatch):
    # Each route forced on every Linear layer: the kernel, the materialised weight gradients, each example's
    # weight gradients kept whole, or formed a piece of one example at a time and formed again for the
    # contributions (over their memory budget). One row per example (an MLP), a layer called twice, padded
    # sequences through a transformer block and through attention alone, and the Linear inside PyTorch's encoder.
    linear = importlib.import_module("gradconflict.measure.rules.linear")
    _over_budget_if_asked(route, monkeypatch)
    monkeypatch.setattr(linear, "attribution_route", lambda *args: route.split(",")[0])
    for family in ("mlp", "reused_module", "embedding_layernorm"):
        model, x = FAMILIES[family](3)
        check_against_oracle(model, x, batch_losses(reduction))
    ids = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 3, 4, 12], [9, 9, 2, 8, 0]])
    check_against_oracle(MultiTask(Block(), linear_heads(8, 3)), ids, per_token_losses((ids != 0).double(), reduction))
    model = MultiTask(Attention(), linear_heads(8, 2), pool=lambda h: h.mean(1))
    check_against_oracle(model, torch.randn(4, 6, 8), batch_losses(reduction))
    model, x = FAMILIES["transformer"](3)
    check_against_oracle(model, x, batch_losses(reduction), complete=False)


def test_linear_route_follows_the_size_rule():
    # One row per example through wide layers: the kernel; many short examples: the materialised gradients;
    # long sequences through a layer too wide for the kernel: each example's weight gradients, whose sum is the
    # Gram.
    bb = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    model = MultiTask(bb, linear_heads(8, 2), pool=lambda h: h.mean(1))
    routes = {}
    for name, x in [("rows", torch.randn(3, 1, 64)), ("short", torch.randn(400, 2, 64)),
                    ("long", torch.randn(3, 200, 64))]:
        report = attributed(model, x, losses_of)
        routes[name] = report.layers["backbone.0"].route
    assert routes == {"rows": "ghost", "short": "materialised", "long": "per-example"}
    check_against_oracle(model, torch.randn(3, 200, 64))


def test_embedding_scale_grad_by_freq_matches_oracle(route: str):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5, scale_grad_by_freq=True)

        def forward(self, ids):
            self.out = self.emb(ids)
            return self.out.tanh().sum(1)

    model, ids = MultiTask(Net(), linear_heads(5, 3)), torch.tensor([[1, 1, 2], [2, 3, 1], [6, 6, 6]])
    samples = attributed(model, ids, losses_of).samples
    # scale_grad_by_freq divides by an id's count in the whole batch, so one-example forwards would see other
    # counts: the oracle takes each task's gradient at the embedding's output from autograd and adds example n's
    # positions into its own table, divided by the batch's counts, as the definition says.
    losses = losses_of(model(ids))
    counts = torch.bincount(ids.flatten(), minlength=7).double()
    rows = []
    for loss in losses.values():
        (D,) = torch.autograd.grad(loss, model.backbone.out, retain_graph=True)
        rows.append(torch.stack([
            torch.zeros(7, 5).index_add_(0, ids[n], D[n] / counts[ids[n]][:, None]).flatten() for n in range(3)
        ]))
    J = torch.stack(rows)
    assert samples.omitted == {}
    assert rel_err(samples.contribution, einsum(J, J.sum(1), "t n p, s p -> n t s")) <= RTOL
    assert rel_err(samples.within, einsum(J, J, "t n p, s n p -> n t s")) <= RTOL


class Attention(nn.Module):
    """Causal self-attention with separate q, k, v, o projections (every parameter has a layer rule)."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        def split(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        h = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(h.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """A pre-norm transformer block: embedding, LayerNorm, attention, LayerNorm, MLP."""

    def __init__(self, vocab: int = 13, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


def per_token_losses(mask: Tensor, reduction: str) -> Losses:
    """Per-token losses of every task, masked, reduced by the mean over real tokens or by their sum."""

    def losses(out: dict[str, Tensor]) -> dict[str, Tensor]:
        result = {}
        for k, (t, o) in enumerate(out.items()):
            per_token = ((o.squeeze(-1) - 0.5 * k) ** 2) * mask
            result[t] = per_token.sum() / (mask.sum() if reduction == "mean" else 1)
        return result

    return losses


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_transformer_block_with_padding_mask_matches_oracle(reduction: str, route: str):
    ids = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 3, 4, 12], [9, 9, 2, 8, 0]])
    mask = (ids != 0).double()
    model = MultiTask(Block(), linear_heads(8, 3))
    samples = check_against_oracle(model, ids, per_token_losses(mask, reduction))
    assert samples.contribution.abs().sum() > 0


def test_attention_alone_matches_oracle(route: str):
    model = MultiTask(Attention(), linear_heads(8, 2), pool=lambda h: h.mean(1))
    check_against_oracle(model, torch.randn(4, 6, 8))


def test_multihead_attention_parameters_are_left_out_and_named(route: str):
    model, x = FAMILIES["transformer"](3)
    samples = check_against_oracle(model, x, complete=False)
    assert {"backbone.enc.self_attn.in_proj_weight", "backbone.enc.self_attn.out_proj.weight"} <= set(samples.omitted)
    assert "backbone.enc.linear1.weight" in samples.parameters
    assert "rule" in samples.omitted["backbone.enc.self_attn.in_proj_weight"]


def test_hugging_face_conv1d_matches_oracle(route: str):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    bb = nn.Sequential(Conv1D(12, 6), nn.Tanh(), Conv1D(6, 12))
    model = MultiTask(bb, linear_heads(6, 2), pool=lambda h: h.mean(1))
    check_against_oracle(model, torch.randn(5, 3, 6))


def test_float32_sum_check_and_gram():
    torch.set_default_dtype(torch.float32)
    model, x = FAMILIES["embedding_layernorm"](4)
    report = attributed(model, x, losses_of)
    assert report.samples.contribution.dtype == torch.float32
    assert report.samples.residual <= 1e-5
    assert rel_err(report.samples.gram, report.gram) <= 1e-6


def test_ids_kept_in_batch_order_and_grad_untouched_by_attribution():
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    with ConflictMonitor(model) as monitor:
        report = monitor.backward(losses_of(model(x)), sample_ids=torch.arange(100, 100 + x.shape[0]).flip(0))
    sum(losses_of(twin(x)).values()).backward()
    assert report.samples.ids.tolist() == list(range(100 + x.shape[0] - 1, 99, -1))
    assert report.samples.tasks == report.tasks
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_pushes_apart_is_the_symmetric_part():
    model, x = FAMILIES["mlp"](3)
    samples = attributed(model, x, losses_of).samples
    c = samples.contribution
    assert torch.equal(samples.pushes_apart("t0", "t2"), c[:, 0, 2] + c[:, 2, 0])
    assert rel_err(samples.pushes_apart(0, 2).sum(), 2 * samples.gram[0, 2]) <= RTOL


def test_bad_ids_and_unsupported_setups_are_refused():
    model, x = FAMILIES["mlp"](2)
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        with pytest.raises(ValueError, match="no measured layer's input has 7 rows"):
            monitor.measure(losses_of(model(x)), sample_ids=range(7))
        with pytest.raises(ValueError, match="1-D"):
            monitor.measure(losses_of(model(x)), sample_ids=[[1, 2]])
        with pytest.raises(ValueError, match="integers"):
            monitor.measure(losses_of(model(x)), sample_ids=torch.rand(x.shape[0]))
    for kwargs, match in [({"engine": "reference"}, "engine='auto'"), ({"strategy": "loop"}, "strategy='loop'")]:
        with ConflictMonitor(model, shared=model.backbone, **kwargs) as monitor:
            with pytest.raises(ValueError, match=match):
                monitor.backward(losses_of(model(x)), sample_ids=range(x.shape[0]))


def test_grad_scaler_is_divided_out_of_the_attribution():
    model, x = FAMILIES["mlp"](2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with ConflictMonitor(model, shared=model.backbone, scaler=scaler) as monitor:
        report = monitor.backward(losses_of(model(x)), sample_ids=range(x.shape[0]))
    plain = attributed(model, x, losses_of)
    assert rel_err(report.samples.contribution, plain.samples.contribution) <= 1e-9
    assert rel_err(report.samples.within, plain.samples.within) <= 1e-9
    assert rel_err(report.samples.gram, report.gram) <= 1e-9


class Convolutions(nn.Module):
    """The settings a convolution's attribution meets: stride, dilation, groups, bias or none, asymmetric kernels,
    zero, circular and 'same' padding, 1-D and 3-D, and one convolution called twice."""

    def __init__(self):
        super().__init__()
        self.dilated = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.grouped = nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), groups=2, bias=False)
        self.circular = nn.Conv2d(6, 6, 3, padding="same", padding_mode="circular", groups=3)
        self.twice = nn.Conv1d(6, 6, 2, stride=2)
        self.volume = nn.Conv3d(1, 2, (2, 1, 2), stride=(1, 1, 2), padding=(1, 0, 0))

    def forward(self, x):
        h = self.circular(self.grouped(self.dilated(x).tanh()).tanh()).tanh()  # [B, 6, 4, 2]
        line = self.twice(self.twice(h.flatten(2)).tanh())  # [B, 6, 2]
        return self.volume(line.reshape(-1, 1, 3, 2, 2)).flatten(1)  # [B, 2 * 4 * 2 * 1]


def batch_losses(reduction: str) -> Losses:
    """Each example's loss per task, reduced over the batch by the mean or the sum."""

    def losses(out: dict[str, Tensor]) -> dict[str, Tensor]:
        per_example = {t: ((o - 0.5 * k) ** 2).sum(1) + o.sin().sum(1) for k, (t, o) in enumerate(out.items())}
        return {t: v.mean() if reduction == "mean" else v.sum() for t, v in per_example.items()}

    return losses


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("route", ["per-example", "per-example, formed twice", "kernel"])
def test_convolution_routes_match_oracle(route: str, reduction: str, monkeypatch: pytest.MonkeyPatch):
    # Each route forced on every convolution (the kernel route only takes a layer called once): the per-example
    # weight gradients kept whole, or formed one example at a time and formed again for the contributions (over
    # their memory budget), or the kernel route's forward convolution and patch kernels.
    conv = importlib.import_module("gradconflict.measure.rules.conv")
    _over_budget_if_asked(route, monkeypatch)
    monkeypatch.setattr(conv, "kernel_is_cheaper", lambda *args: route == "kernel")
    model = MultiTask(Convolutions(), linear_heads(16, 3))
    check_against_oracle(model, torch.randn(5, 3, 9, 8), batch_losses(reduction))
    model, x = FAMILIES["cnn"](3)
    check_against_oracle(model.eval(), torch.randn(3, 3, 16, 16), batch_losses(reduction))


def test_convolution_route_follows_the_size_rule():
    # Wide channels on a 2 x 2 image: the kernel route (the Gram from the per-task backward); a narrow layer on
    # a 16 x 16 image: the per-example gradients, whose sum is the Gram.
    bb = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Tanh(), nn.Conv2d(64, 64, 3, stride=8, padding=1))
    model = MultiTask(bb, linear_heads(256, 2), pool=lambda h: h.flatten(1))
    x = torch.randn(3, 3, 16, 16)
    report = attributed(model, x, losses_of)
    assert report.layers["backbone.0"].route == "per-example"
    assert report.layers["backbone.2"].route == "materialised"
    check_against_oracle(model, x)


def test_per_example_blocks_reused_across_layers_and_steps(route: str, monkeypatch: pytest.MonkeyPatch):
    # One monitor attributes three batches in turn, every Linear layer and convolution on its per-example route:
    # each layer's per-example gradients are formed where the previous layer's (and the previous step's) lay,
    # larger or smaller, so values left from an earlier layer or step would show against the oracle.
    linear = importlib.import_module("gradconflict.measure.rules.linear")
    conv = importlib.import_module("gradconflict.measure.rules.conv")
    monkeypatch.setattr(linear, "attribution_route", lambda *args: "per-example")
    monkeypatch.setattr(conv, "kernel_is_cheaper", lambda *args: False)
    bb = nn.Sequential(Convolutions(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16))
    model = MultiTask(bb, linear_heads(16, 3))
    losses = batch_losses("mean")
    with ConflictMonitor(model, shared=model.backbone) as monitor:
        for examples in (5, 2, 4):
            x = torch.randn(examples, 3, 9, 8)
            samples = monitor.measure(losses(model(x)), sample_ids=torch.arange(examples)).samples
            assert samples is not None and samples.omitted == {}
            contribution, within = per_example_oracle(model, x, losses, samples.parameters)
            assert rel_err(samples.contribution, contribution) <= RTOL
            assert rel_err(samples.within, within) <= RTOL
    # Closing the monitor frees the blocks the engine kept between attributed steps.
    assert monitor.engine._scratch._blocks == {}


def test_norms_over_two_dimensional_inputs_match_oracle(route: str):
    # A LayerNorm, an RMSNorm or a BatchNorm1d over [N, C]: each example's gradient is its own row, nothing left to
    # sum over (every such attributed step was once skipped: an empty sum reduced every axis).
    bb = nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 8),
        nn.BatchNorm1d(8).eval(),
    )
    check_against_oracle(MultiTask(bb, linear_heads(8, 3)), torch.randn(5, 6))


class Checkpointed(nn.Module):
    """A Linear layer, then a checkpointed segment (a Linear layer and a LayerNorm)."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(6, 12), nn.Linear(12, 12), nn.LayerNorm(12)
        self.reentrant = reentrant

    def segment(self, h: Tensor) -> Tensor:
        return self.norm(torch.tanh(self.b(h)))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.reentrant is None:
            return self.segment(h)
        return torch.utils.checkpoint.checkpoint(self.segment, h, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_segments_match_oracle(reentrant: bool):
    # The oracle runs the same model without the checkpoint (reentrant checkpoints refuse autograd.grad).
    model = MultiTask(Checkpointed(reentrant), linear_heads(12, 3))
    x = torch.randn(8, 6)
    report = attributed(model, x, losses_of)
    plain = copy.deepcopy(model)
    plain.backbone.reentrant = None
    samples = report.samples
    assert samples.omitted == {} and samples.residual <= RTOL
    contribution, within = per_example_oracle(plain, x, losses_of, samples.parameters)
    assert rel_err(samples.contribution, contribution) <= RTOL
    assert rel_err(samples.within, within) <= RTOL
