"""Per-sample attribution of accumulation groups, against the float64 per-example oracle of the whole group.

A group's per-task gradient is the sum of its micro-batches' (``g_i = sum_m grad L_i^(m)``), and example ``n`` of
micro-batch ``m`` contributes ``<g_i^(n), g_j>`` against the whole group's ``g_j``. The oracle takes every example's
gradient of the sum of the micro-batches' losses, each computed on its own rows, so that a per-micro-batch mean
or mask is what the training loop's is.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from einops import einsum
from torch import Tensor, nn

from gradconflict import ConflictMonitor
from tests.measure.test_attribution import (
    RTOL,
    Block,
    Checkpointed,
    Convolutions,
    Losses,
    batch_losses,
    per_example_oracle,
    per_token_losses,
    rel_err,
)
from tests.zoo import FAMILIES, MultiTask, linear_heads, losses_of

pytestmark = pytest.mark.usefixtures("float64_default")


def group_losses(parts: list[slice], losses: Losses, masks: list[Tensor] | None = None) -> Losses:
    """The group's losses on the concatenated outputs: each micro-batch's ``losses`` on its own rows, summed."""

    def total(out: dict[str, Tensor]) -> dict[str, Tensor]:
        each = [
            (losses if masks is None else per_token_losses(masks[k], "mean"))({t: o[rows] for t, o in out.items()})
            for k, rows in enumerate(parts)
        ]
        return {t: sum(e[t] for e in each) for t in each[0]}

    return total


def split(n: int, sizes: list[int]) -> list[slice]:
    assert sum(sizes) == n
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [slice(s, s + k) for s, k in zip(starts, sizes)]


def accumulate(model: nn.Module, x: Tensor, parts: list[slice], losses: Losses = losses_of, **kwargs):
    """One group over ``parts`` of ``x`` (ids 100 + row), attributed; returns the group's report, once checked
    that ``.grad`` is the plain loop's (a copy of the model trained without the monitor)."""
    twin = copy.deepcopy(model)
    ids = torch.arange(x.shape[0]) + 100
    with ConflictMonitor(model, shared=model.backbone, accumulation_steps=len(parts), **kwargs) as monitor:
        reports = [monitor.backward(losses(model(x[rows])), sample_ids=ids[rows]) for rows in parts]
    assert reports[:-1] == [None] * (len(parts) - 1)
    scaler = kwargs.get("scaler")
    for rows in parts:
        total = sum(losses(twin(x[rows])).values())
        (total if scaler is None else scaler.scale(total)).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), name  # the monitor never changes what training computes
    return reports[-1]


def check_group(model: nn.Module, x: Tensor, sizes: list[int], losses: Losses = losses_of, **kwargs):
    parts = split(x.shape[0], sizes)
    report = accumulate(model, x, parts, losses, **kwargs)
    samples = report.samples
    assert samples is not None and samples.omitted == {}
    assert samples.ids.tolist() == list(range(100, 100 + x.shape[0]))
    contribution, within = per_example_oracle(model, x, group_losses(parts, losses), samples.parameters)
    assert rel_err(samples.contribution, contribution) <= RTOL
    assert rel_err(samples.within, within) <= RTOL
    assert rel_err(samples.gram, report.gram) <= RTOL and samples.residual <= RTOL
    return report


@pytest.mark.parametrize("family", ["mlp", "wide_mlp", "embedding_layernorm", "reused_module", "deep_heads"])
def test_zoo_groups_match_the_oracle(family: str):
    model, x = FAMILIES[family](3)
    n = x.shape[0]
    check_group(model, x, [1, n - 1] if n < 4 else [n // 4, n // 2, n - n // 4 - n // 2])


@pytest.mark.parametrize("route", ["per-example", "kernel"])
def test_convolutions_in_uneven_micro_batches_match_the_oracle(route: str, monkeypatch: pytest.MonkeyPatch):
    conv = importlib.import_module("gradconflict.measure.rules.conv")
    monkeypatch.setattr(conv, "kernel_is_cheaper", lambda *args: route == "kernel")
    model = MultiTask(Convolutions(), linear_heads(16, 3))
    check_group(model, torch.randn(6, 3, 9, 8), [2, 1, 3], batch_losses("mean"))


@pytest.mark.parametrize("route", ["per-example", "materialised", "kernel"])
def test_transformer_block_with_a_mask_per_micro_batch_matches_the_oracle(route: str, monkeypatch: pytest.MonkeyPatch):
    # Each micro-batch's loss is its own masked mean over its real tokens; every Linear layer forced on a route.
    linear = importlib.import_module("gradconflict.measure.rules.linear")
    monkeypatch.setattr(linear, "attribution_route", lambda *args: route)
    ids = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 3, 4, 12], [9, 9, 2, 8, 0], [4, 0, 0, 0, 0]])
    model = MultiTask(Block(), linear_heads(8, 3))
    parts = split(4, [3, 1])
    masks = [(ids[rows] != 0).double() for rows in parts]

    def losses(out: dict[str, Tensor]) -> dict[str, Tensor]:  # the micro-batch's own mask, by its size
        mask = masks[0] if next(iter(out.values())).shape[0] == 3 else masks[1]
        return per_token_losses(mask, "mean")(out)

    report = check_group(model, ids, [3, 1], losses)
    assert report.samples.contribution[3].abs().sum() > 0


def test_grad_scaler_is_divided_out_of_a_group():
    model, x = FAMILIES["mlp"](2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plain = check_group(copy.deepcopy(model), x, [4, 6, 10])
    scaled = accumulate(model, x, split(x.shape[0], [4, 6, 10]), scaler=scaler)
    for field in ("contribution", "within", "gram"):
        assert rel_err(getattr(scaled.samples, field), getattr(plain.samples, field)) <= 1e-9, field


def test_a_short_group_the_run_tallies_and_unmeasured_groups():
    # every=2: groups 0 and 2 are measured and attributed, group 1 is not (its ids are ignored, as on an unmeasured
    # step); the epoch's last group ends early (end_group); the per-id tally counts each attributed example once.
    model, x = FAMILIES["mlp"](2)
    ids = torch.arange(x.shape[0])
    with ConflictMonitor(model, shared=model.backbone, accumulation_steps=2, every=2) as monitor:
        for group in range(2):
            for rows in split(8, [4, 4]):
                report = monitor.backward(losses_of(model(x[rows])), sample_ids=ids[rows] + 8 * group)
        assert report is None and monitor.step == 2
        monitor.backward(losses_of(model(x[:4])), sample_ids=ids[:4] + 16)
        report = monitor.end_group()
    assert report.samples.ids.tolist() == [16, 17, 18, 19] and report.samples.residual <= RTOL
    tally = monitor.history.samples.pair("t0", "t1")
    assert sorted(tally) == [*range(8), 16, 17, 18, 19]
    assert all(row["count"] == 1 for row in tally.values())


def test_ids_on_some_micro_batches_only_or_wrong_are_refused_and_nothing_is_written():
    model, x = FAMILIES["mlp"](2)
    first, second = split(x.shape[0], [10, 10])
    with ConflictMonitor(model, shared=model.backbone, accumulation_steps=2) as monitor:
        monitor.backward(losses_of(model(x[first])), sample_ids=range(10))
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(ValueError, match="on every micro-batch of a group or on none"):
            monitor.backward(losses_of(model(x[second])))
        swapped = dict(reversed(list(losses_of(model(x[second])).items())))
        with pytest.raises(ValueError, match=r"same tasks, in the same order.*\['t0', 't1'\] before"):
            monitor.backward(swapped, sample_ids=range(10, 20))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # nothing written
        report = monitor.backward(losses_of(model(x[second])), sample_ids=range(10, 20))
        assert report.samples.ids.tolist() == list(range(20)) and report.samples.residual <= RTOL
        # ids that match no measured layer: refused before this micro-batch is written; the group is skipped
        monitor.backward(losses_of(model(x[first])), sample_ids=range(10))
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(ValueError, match="sample_ids has 3 ids"):
            monitor.backward(losses_of(model(x[second])), sample_ids=range(3))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        report = monitor.backward(losses_of(model(x[second])), sample_ids=range(10, 20))
        assert report.skipped and "sample_ids refused" in report.skip_reason and report.samples is None


def test_micro_batches_are_tapped_while_groups_are_attributed():
    # Taps cost a measured group's micro-batches about 10% on a small model, and only attribution needs them: the
    # first group is tapped, a group without sample_ids leaves the next one untapped (given ids anyway, it is
    # measured without attribution, warned), and a group with them has the next one tapped again.
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    halves = split(x.shape[0], [10, 10])
    ids = torch.arange(x.shape[0])
    armed, samples = [], []
    with ConflictMonitor(model, shared=model.backbone, accumulation_steps=2) as monitor:
        for group in (False, True, True, False, True):
            armed.append(monitor.engine.capture.armed)
            for k, rows in enumerate(halves):
                if group and not armed[-1] and k == 0:  # warned once, on the group's first micro-batch
                    with pytest.warns(UserWarning, match="measured without attribution"):
                        report = monitor.backward(losses_of(model(x[rows])), sample_ids=ids[rows])
                else:
                    report = monitor.backward(losses_of(model(x[rows])), sample_ids=ids[rows] if group else None)
            assert not report.skipped
            samples.append(report.samples)
    assert armed == [True, False, True, True, False]
    assert [s is not None for s in samples] == [False, False, True, False, False]
    assert samples[2].residual <= RTOL
    for _ in range(5):
        for rows in halves:
            sum(losses_of(twin(x[rows])).values()).backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))


def ragged_oracle(model: nn.Module, micro_batches: list[Tensor], names: list[str]) -> tuple[Tensor, Tensor]:
    """The per-example oracle of a group whose micro-batches differ in shape beyond dim 0: every example its own
    copy of the parameters ``names``, each micro-batch's ``losses_of`` on its own examples, summed."""
    params = dict(model.named_parameters())
    copies, totals = [], None
    for x in micro_batches:
        mine = [{n: params[n].detach().clone().requires_grad_() for n in names} for _ in range(x.shape[0])]
        outputs = [torch.func.functional_call(model, {**params, **c}, (x[k : k + 1],)) for k, c in enumerate(mine)]
        losses = losses_of({t: torch.cat([o[t] for o in outputs]) for t in outputs[0]})
        totals = losses if totals is None else {t: totals[t] + losses[t] for t in losses}
        copies += mine
    leaves = [c[n] for c in copies for n in names]
    rows = []
    for loss in totals.values():
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, materialize_grads=True)
        size = len(names)
        rows.append(torch.stack([torch.cat([g.flatten() for g in grads[k * size : (k + 1) * size]])
                                 for k in range(len(copies))]))
    J = torch.stack(rows)
    return einsum(J, J.sum(1), "t n p, s p -> n t s"), einsum(J, J, "t n p, s n p -> n t s")


def test_groups_that_cannot_be_joined_are_attributed_micro_batch_by_micro_batch():
    # An eval-mode BatchNorm keeps its statistics with its input, and sequences differ in length from one
    # micro-batch to the next: those layers are attributed against the group's gradients, micro-batch by
    # micro-batch; the others are joined. Both against the oracle.
    model, _ = FAMILIES["cnn"](3)
    check_group(model.eval(), torch.randn(5, 3, 16, 16), [2, 3], batch_losses("mean"))
    block = MultiTask(Block(), linear_heads(8, 2))
    long, short = torch.tensor([[3, 5, 7, 1, 2], [1, 2, 3, 4, 12]]), torch.tensor([[9, 9, 2], [4, 1, 6], [2, 2, 2]])
    twin = copy.deepcopy(block)
    with ConflictMonitor(block, shared=block.backbone, accumulation_steps=2) as monitor:
        monitor.backward(losses_of(block(long)), sample_ids=[0, 1])
        report = monitor.backward(losses_of(block(short)), sample_ids=[2, 3, 4])
    for tokens in (long, short):
        sum(losses_of(twin(tokens)).values()).backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(block.parameters(), twin.parameters()))
    samples = report.samples
    assert samples.omitted == {} and samples.residual <= RTOL
    contribution, within = ragged_oracle(block, [long, short], samples.parameters)
    assert rel_err(samples.contribution, contribution) <= RTOL
    assert rel_err(samples.within, within) <= RTOL


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_retained_activation_gradients_stay_the_plain_loops_when_attributed(accumulation_steps: int):
    # An attributed step's measuring backward once wrote its vmapped gradients into a retained activation's .grad,
    # and the training backward then failed on it.
    model, x = FAMILIES["mlp"](2)
    twin = copy.deepcopy(model)
    parts = split(x.shape[0], [10, 10] if accumulation_steps == 2 else [20])
    with ConflictMonitor(model, shared=model.backbone, accumulation_steps=accumulation_steps) as monitor:
        for rows in parts:
            h, twin_h = model.backbone(x[rows]), twin.backbone(x[rows])
            h.retain_grad(), twin_h.retain_grad()
            report = monitor.backward({t: head(h).pow(2).mean() for t, head in model.heads.items()},
                                      sample_ids=range(rows.start, rows.stop))
            sum(head(twin_h).pow(2).mean() for head in twin.heads.values()).backward()
            assert torch.equal(h.grad, twin_h.grad)
    assert report.samples.residual <= RTOL
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_segments_in_a_group_match_the_oracle(reentrant: bool):
    model = MultiTask(Checkpointed(reentrant), linear_heads(12, 3))
    x, parts = torch.randn(8, 6), split(8, [3, 5])
    report = accumulate(model, x, parts)
    plain = copy.deepcopy(model)
    plain.backbone.reentrant = None
    samples = report.samples
    assert samples.omitted == {} and samples.residual <= RTOL
    contribution, within = per_example_oracle(plain, x, group_losses(parts, losses_of), samples.parameters)
    assert rel_err(samples.contribution, contribution) <= RTOL
    assert rel_err(samples.within, within) <= RTOL
