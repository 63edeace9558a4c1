"""Data-parallel training (gloo, 2 processes on CPU): a monitored step leaves every rank with the ``.grad`` that
DDP's own backward gives, every rank gets the same report, and the Gram is that of the global batch: exact, or
sketched within its documented bound, or each rank's own when asked. Each scenario runs in two spawned processes;
the oracle is a single process over the concatenated batch (float64)."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gradconflict import ConflictMonitor, JSONLSink
from gradconflict.measure.distributed import sketch_std
from tests.zoo import FAMILIES, losses_of, reference

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def spawn(fn, tmp_path, *args, timeout: float = 120) -> None:
    """Run ``fn(rank, folder, *args)`` on ``WORLD`` gloo ranks. A rank that raises fails the test; so does a run still
    going after ``timeout`` seconds (a hang: every rank is killed), and a collective waits at most that long."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init = str(tmp_path / "init")
    context = mp.start_processes(_run, args=(fn, init, str(tmp_path), timeout, *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"the {WORLD} ranks were still running after {timeout} s: a hang")


def _run(rank: int, fn, init_file: str, folder: str, timeout: float, *args) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=timeout)
    )
    torch.set_default_dtype(torch.float64)
    try:
        fn(rank, folder, *args)
    finally:
        # free the DDP wrappers (their reducers hold the group; the monitor's references keep them in cycles)
        # before the group goes: freed at exit instead, a reducer aborts the process now and then
        gc.collect()
        dist.destroy_process_group()


def batches(x: torch.Tensor, sizes: list[int], seed: int = 100) -> list[torch.Tensor]:
    """The global batch, cut into one batch per rank (every rank draws the same numbers)."""
    torch.manual_seed(seed)
    full = torch.randn(sum(sizes), *x.shape[1:])
    return list(full.split(sizes))


# ------------------------------------------------------------------------------------------------- scenarios
def _exact_and_grads(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES["conv1d_3d"](3)  # GroupNorm: per-sample statistics, the same whatever the split
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model)
    ddp, ddp_twin = DDP(model), DDP(twin)
    parts = batches(x, [2, 2])
    with ConflictMonitor(ddp, sinks=[JSONLSink(f"{folder}/run.jsonl")]) as monitor:
        report = monitor.backward(losses_of(ddp(parts[rank])))
        kept = monitor.history[-1]
    assert report.sync == "exact" and kept.sync == "exact" and not report.approximate
    assert "backbone.c1" in report.layers  # names without DDP's "module." prefix
    sum(losses_of(ddp_twin(parts[rank])).values()).backward()
    for (name, a), t in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, t.grad), name
    # the oracle: one process, the concatenated batch (equal halves: the mean loss is DDP's mean of means)
    full = torch.cat(parts)
    expected = reference(oracle, losses_of(oracle(full)))
    assert rel_err(report.gram, expected.gram) <= 1e-9
    for name, layer in report.layers.items():
        assert rel_err(layer.gram, expected.layers[name]) <= 1e-9, name
    expected_losses = torch.stack(list(losses_of(oracle(full)).values()))
    torch.testing.assert_close(report.losses, expected_losses.detach(), rtol=1e-7, atol=1e-9)
    dist.barrier()
    lines = open(f"{folder}/run.jsonl").read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["sync"] == "exact"  # rank 0 alone wrote


def _uneven_and_local(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    oracle = copy.deepcopy(model)
    ddp = DDP(model)
    parts = batches(x, [5, 3])  # an uneven last batch
    with ConflictMonitor(ddp) as monitor:
        report = monitor.backward(losses_of(ddp(parts[rank])))
    # DDP averages the ranks' gradients: the oracle is the mean of the per-rank mean losses
    per_rank = [losses_of(oracle(p)) for p in parts]
    mean = {t: sum(d[t] for d in per_rank) / WORLD for t in per_rank[0]}
    assert rel_err(report.gram, reference(oracle, mean).gram) <= 1e-9
    model.zero_grad()
    with ConflictMonitor(ddp, sync="local") as local:
        report = local.backward(losses_of(ddp(parts[rank])))
    assert report.sync == "local"
    assert rel_err(report.gram, reference(oracle, losses_of(oracle(parts[rank]))).gram) <= 1e-9


def _sketch(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES["wide_mlp"](4)
    oracle = copy.deepcopy(model)
    ddp = DDP(model)
    parts = batches(x, [4, 4])
    expected = reference(oracle, losses_of(oracle(torch.cat(parts))))
    for k in (256, 4096):
        with ConflictMonitor(ddp, sync="sketch", sketch_size=k) as monitor:
            report = monitor.backward(losses_of(ddp(parts[rank])))
        model.zero_grad()
        assert report.sync == "sketch" and report.approximate  # an estimate, and the report says so
        # documented: each entry's standard deviation is at most sqrt(2/k) n_i n_j; allow 5 of them
        for got, exact in [(report.gram, expected.gram)] + [(report.layers[n].gram, g) for n, g in
                                                            expected.layers.items()]:
            n = exact.diagonal().sqrt()
            bound = 5 * sketch_std(k) * torch.outer(n, n)
            assert ((got - exact).abs() <= bound).all(), (k, (got - exact).abs() / torch.outer(n, n))


def _nan_on_one_rank(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](2)
    ddp = DDP(model)

    def step():
        losses = losses_of(ddp(x))
        if rank == 1:
            losses["t0"] = losses["t0"] * math.nan
        return losses

    with ConflictMonitor(ddp, on_nonfinite="skip") as monitor:
        report = monitor.backward(step())
        assert report.skipped and "non-finite loss" in report.skip_reason  # on both ranks
        assert all(p.grad is None for p in model.parameters())
        assert not monitor.backward(losses_of(ddp(x))).skipped  # and training goes on, in step
    with ConflictMonitor(ddp) as monitor, pytest.raises(FloatingPointError):
        monitor.backward(step())


def _every_and_no_sync(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model)
    ddp, ddp_twin = DDP(model), DDP(twin)
    with ConflictMonitor(ddp, every=3) as monitor:
        monitor.backward(losses_of(ddp(x)))
        sent = monitor._sync.bytes_sent
        for _ in range(2):
            assert monitor.backward(losses_of(ddp(x))) is None
        assert monitor._sync.bytes_sent == sent  # unmeasured steps cost no extra communication
    model.zero_grad()
    micro = batches(x, [3, 3, 3, 3])  # 2 micro-batches per rank, under no_sync but the last
    mine = micro[2 * rank : 2 * rank + 2]
    with ConflictMonitor(ddp, accumulation_steps=2) as monitor:
        with ddp.no_sync():
            assert monitor.backward(losses_of(ddp(mine[0]))) is None
        report = monitor.backward(losses_of(ddp(mine[1])))
    with ddp_twin.no_sync():
        sum(losses_of(ddp_twin(mine[0])).values()).backward()
    sum(losses_of(ddp_twin(mine[1])).values()).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    # each rank's accumulated gradient is a sum over its micro-batches; DDP averages the ranks
    per_rank = [[losses_of(oracle(m)) for m in micro[2 * r : 2 * r + 2]] for r in range(WORLD)]
    total = {t: sum(d[t] for r in per_rank for d in r) / WORLD for t in per_rank[0][0]}
    assert rel_err(report.gram, reference(oracle, total).gram) <= 1e-9


# ------------------------------------------------------------------------------------------------- tests
def test_exact_gram_is_the_global_batchs_and_grad_is_ddps(tmp_path):
    spawn(_exact_and_grads, tmp_path)


def test_uneven_last_batch_and_local_mode(tmp_path):
    spawn(_uneven_and_local, tmp_path)


def test_sketch_error_within_its_documented_bound(tmp_path):
    spawn(_sketch, tmp_path)


def test_a_nan_on_one_rank_makes_every_rank_skip_or_raise(tmp_path):
    spawn(_nan_on_one_rank, tmp_path)


def test_unmeasured_steps_send_nothing_and_no_sync_accumulation_is_exact(tmp_path):
    spawn(_every_and_no_sync, tmp_path)


def _fsdp2(rank: int, folder: str, mode: str) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model)
    for m in (model, twin):
        for layer in m.backbone:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    parts = batches(x, [4, 4])
    with ConflictMonitor(model, sync=mode) as monitor:
        report = monitor.backward(losses_of(model(parts[rank])))
        assert monitor.shared_parameters == [n for n, _ in oracle.named_parameters() if n.startswith("backbone")]
    sum(losses_of(twin(parts[rank])).values()).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad.to_local(), b.grad.to_local()), name
    expected = reference(oracle, losses_of(oracle(torch.cat(parts))))
    assert sorted(report.layers) == sorted(expected.layers)
    if mode == "exact":
        assert rel_err(report.gram, expected.gram) <= 1e-9
    else:
        n = expected.gram.diagonal().sqrt()
        assert ((report.gram - expected.gram).abs() <= 5 * sketch_std(4096) * torch.outer(n, n)).all()


def _fully_shard_runs_on_cpu() -> str | None:
    """Why FSDP2 cannot be tested here, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return f"torch.distributed.fsdp.fully_shard is not available ({err})"
    return None


@pytest.mark.skipif(_fully_shard_runs_on_cpu() is not None, reason=str(_fully_shard_runs_on_cpu()))
@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_fsdp2_grad_is_fsdps_and_the_gram_is_the_global_batchs(tmp_path, mode):
    spawn(_fsdp2, tmp_path, mode)


def test_the_ddp_example_runs_under_torchrun():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "ddp.py"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(example)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 rank(s), sync=exact" in out.stdout and "cos=-1.000" in out.stdout


def _fsdp2_nccl(rank: int, folder: str) -> None:
    torch.cuda.set_device(rank)
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda", (WORLD,))
    torch.manual_seed(0)
    model, x = FAMILIES["mlp"](3)
    model, oracle = model.cuda(), copy.deepcopy(model).cuda()
    for layer in model.backbone:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    parts = [p.cuda() for p in batches(x, [4, 4])]
    with ConflictMonitor(model) as monitor:
        report = monitor.backward(losses_of(model(parts[rank])))
    expected = reference(oracle, losses_of(oracle(torch.cat(parts))))
    assert rel_err(report.gram, expected.gram) <= 1e-9


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices"
)
def test_fsdp2_on_gpus_with_nccl(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_run_nccl, args=(_fsdp2_nccl, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)


def _run_nccl(rank: int, fn, init_file: str, folder: str) -> None:
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_default_dtype(torch.float64)
    try:
        fn(rank, folder)
    finally:
        dist.destroy_process_group()
