"""Per-example attribution under data parallelism (gloo, 2 processes on CPU), against a float64 oracle in one
process: per-example gradients of the global loss (DDP's mean of the ranks' mean losses) on the whole global
batch, each example on its own copy of the shared parameters (``per_example_oracle``), so that
``contribution[n, i, j] = <g_i^(n), g_j>`` with ``g_j`` the global gradient and the sum over every rank's
examples is the global Gram. Every rank's report holds every rank's examples, and rank 0's tally and JSONL hold
the per-id aggregates of the oracle's; ``.grad`` is DDP's own; a rank without ``sample_ids`` makes every rank
raise, none hang."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradconflict import ConflictMonitor, JSONLSink
from gradconflict.records.samples import SampleTally
from tests.measure.test_attribution import per_example_oracle
from tests.measure.test_distributed import rel_err, spawn
from tests.zoo import FAMILIES, MultiTask, linear_heads, losses_of, reference

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

RTOL = 1e-9
#: Each step: every rank's ids into the dataset, in rank order (uneven, and the other way round at step 2).
STEPS = [[[10, 11, 12, 13, 14], [15, 16, 17]], [[17, 12, 15], [10, 13, 11, 16, 14]]]


def ddp_mean(sizes: list[int]):
    """The global losses of a batch cut into ranks of ``sizes``: the mean over the ranks of each rank's losses (DDP
    averages the ranks' gradients), as a function of the concatenated outputs."""

    def losses(out: dict[str, Tensor]) -> dict[str, Tensor]:
        per_rank = [losses_of({t: o.split(sizes)[r] for t, o in out.items()}) for r in range(len(sizes))]
        return {t: sum(d[t] for d in per_rank) / len(sizes) for t in per_rank[0]}

    return losses


def models() -> dict[str, tuple[nn.Module, Tensor]]:
    """Every rule's route against the global gradients: Linear (its weight and bias), Embedding with LayerNorm and
    RMSNorm, Conv1d, GroupNorm and Conv3d, and Hugging Face's transposed Conv1D; a dataset of 18 examples each
    (ids 0-17)."""
    torch.manual_seed(0)
    out = {"mlp": (FAMILIES["mlp"](3)[0], torch.randn(18, 6))}
    out["embedding_layernorm"] = (FAMILIES["embedding_layernorm"](3)[0], torch.randint(0, 11, (18, 5)))
    out["conv1d_3d"] = (FAMILIES["conv1d_3d"](3)[0], torch.randn(18, 2, 10))
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return out
    backbone = nn.Sequential(Conv1D(8, 4), nn.Tanh(), Conv1D(6, 8))
    out["hf_conv1d"] = (MultiTask(backbone, linear_heads(6, 3)), torch.randn(18, 4))
    return out


def _aggregates(contribution: Tensor, within: Tensor, ids: list[int], tally: dict, tasks: list[str]) -> None:
    """Add one step's oracle rows to ``tally[(a, b)][id]``: count, push, apart and agreement (the within-example
    product over the batch's mean of ``(|g_a^(m)|^2 + |g_b^(m)|^2) / 2``), as the docs define them."""
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            push = contribution[:, i, j] + contribution[:, j, i]
            scale = ((within[:, i, i] + within[:, j, j]) / 2).mean()
            for n, sample_id in enumerate(ids):
                row = tally[(tasks[i], tasks[j])][sample_id]
                row["count"] += 1
                row["push"] += float(push[n])
                row["apart"] += float(push[n] < 0)
                row["agreement"] += float(within[n, i, j] / scale)


def _matches_the_oracle(rank: int, folder: str) -> None:
    for family, (model, data) in models().items():
        twin = copy.deepcopy(model)
        ddp, ddp_twin = DDP(model), DDP(twin)
        opt, opt_twin = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
        path = f"{folder}/{family}.jsonl"
        expected: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        with ConflictMonitor(ddp, shared=model.backbone, sinks=[JSONLSink(path)]) as monitor:
            for step, ranks in enumerate(STEPS):
                oracle = copy.deepcopy(model)  # this step's parameters
                mine = torch.tensor(ranks[rank])
                report = monitor.backward(losses_of(ddp(data[mine])), sample_ids=mine)
                sum(losses_of(ddp_twin(data[mine])).values()).backward()
                for (name, a), b in zip(model.named_parameters(), twin.parameters()):
                    assert torch.equal(a.grad, b.grad), (family, step, name)  # the monitor never changes training
                samples = report.samples
                everyone = [i for r in ranks for i in r]
                assert samples.ids.tolist() == everyone, (family, step)  # every rank's examples, in rank order
                sizes = [len(r) for r in ranks]
                full = data[torch.tensor(everyone)]
                assert samples.omitted == {}, family
                backbone = sorted(n for n, _ in oracle.named_parameters() if n.startswith("backbone"))
                assert sorted(samples.parameters) == backbone
                contribution, within = per_example_oracle(oracle, full, ddp_mean(sizes), samples.parameters)
                assert rel_err(samples.contribution, contribution) <= RTOL, (family, step)
                assert rel_err(samples.within, within) <= RTOL, (family, step)
                global_gram = reference(oracle, ddp_mean(sizes)(oracle(full))).gram
                assert rel_err(report.gram, global_gram) <= RTOL, (family, step)
                assert rel_err(contribution.sum(0), global_gram) <= RTOL  # the oracle's own sum check
                assert rel_err(samples.gram, global_gram) <= RTOL and samples.residual <= RTOL
                _aggregates(contribution, within, everyone, expected, list(report.tasks))
                opt.step(), opt_twin.step()
                opt.zero_grad(), opt_twin.zero_grad()
            tallies = [monitor.history.samples]
        dist.barrier()
        if rank == 0:  # rank 0's sink wrote every rank's examples
            tallies.append(SampleTally.from_jsonl(path))
        for tally in tallies:
            assert sorted(tally.pairs) == sorted(expected)
            for pair, rows in expected.items():
                got = tally.pair(*pair)
                assert sorted(got) == sorted(rows) == list(range(10, 18)), (family, pair)
                for sample_id, row in rows.items():
                    count = row["count"]
                    assert got[sample_id]["count"] == count == 2
                    assert got[sample_id]["apart"] == row["apart"] / count
                    for key in ("push", "agreement"):
                        want = row[key] / count
                        assert abs(got[sample_id][key] - want) <= 1e-9 * max(1.0, abs(want)), (family, key)


def _mismatch_raises_everywhere(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    model, _ = FAMILIES["mlp"](3)
    ddp = DDP(model)
    x = torch.randn(8, 6)[4 * rank : 4 * rank + 4]
    ids = torch.arange(4) + 4 * rank
    with ConflictMonitor(ddp, shared=model.backbone) as monitor:
        with pytest.raises(ValueError, match=r"sample_ids was passed on rank\(s\) \[0\] but not on rank\(s\) \[1\]"):
            monitor.backward(losses_of(ddp(x)), sample_ids=ids if rank == 0 else None)
        assert all(p.grad is None for p in model.parameters()) and monitor.step == 0  # nothing written
        report = monitor.backward(losses_of(ddp(x)), sample_ids=ids)  # and the ranks go on, in step
        assert report.samples.ids.tolist() == list(range(8)) and not report.skipped
        assert monitor.backward(losses_of(ddp(x))).samples is None  # none, on every rank
    model.zero_grad()
    with ConflictMonitor(ddp, shared=model.backbone, accumulation_steps=2) as monitor:  # refused alike, at once
        with pytest.raises(ValueError, match="accumulation_steps > 1 is not supported under sync='exact'"):
            monitor.backward(losses_of(ddp(x)), sample_ids=ids)
        assert all(p.grad is None for p in model.parameters())
    with ConflictMonitor(ddp, shared=model.backbone, sync="sketch") as monitor:
        with pytest.raises(ValueError, match="sync='sketch' does not form"):
            monitor.backward(losses_of(ddp(x)), sample_ids=ids)
        with pytest.raises(ValueError, match=r"passed on rank\(s\) \[1\] but not"):
            monitor.backward(losses_of(ddp(x)), sample_ids=ids if rank == 1 else None)
        assert not monitor.backward(losses_of(ddp(x))).skipped
    model.zero_grad()
    with ConflictMonitor(ddp, shared=model.backbone, sync="local") as monitor:  # each rank its own, no gather
        report = monitor.backward(losses_of(ddp(x)), sample_ids=ids)
    assert report.samples.ids.tolist() == ids.tolist() and report.samples.residual <= RTOL


def test_each_example_against_the_global_gradient_and_every_id_on_rank_0(tmp_path):
    spawn(_matches_the_oracle, tmp_path)


def test_sample_ids_on_some_ranks_only_raise_on_every_rank(tmp_path):
    spawn(_mismatch_raises_everywhere, tmp_path)
