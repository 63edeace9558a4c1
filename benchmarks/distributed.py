"""Data-parallel benchmark: 2 processes (gloo, CPU), DDP, each synchronisation mode of the monitor.

    python -m benchmarks.distributed                    # MLP B=64 per rank, T=4; writes benchmarks/DISTRIBUTED.md
    python -m benchmarks.distributed --workload cnn --tasks 2 4 --output /tmp/dist.md

For each mode (exact, sketch, local) it times a monitored step over a plain DDP step (round-robin, medians after
warm-up, the ratio of one run), counts the bytes the monitor all-reduces per measured step (against the bytes of
DDP's own gradient all-reduce), and measures the sketch's error against the exact Gram as a function of k, over
a few steps: ``max |G_sketch - G| / (n_i n_j)`` against the documented standard deviation ``sqrt(2/k)``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.timing import median, round_robin
from benchmarks.workloads import WORKLOADS, task_losses
from gradconflict import ConflictMonitor
from gradconflict.measure.distributed import sketch_std

WORLD = 2
SKETCH_SIZES = (256, 1024, 4096, 16384)


def _plain_step(model: DDP, x: torch.Tensor, targets: dict[str, torch.Tensor]):
    def step() -> None:
        sum(task_losses(model(x), targets).values()).backward()

    return step


def _monitored_step(monitor: ConflictMonitor, model: DDP, x: torch.Tensor, targets: dict[str, torch.Tensor]):
    def step() -> None:
        monitor.backward(task_losses(model(x), targets))

    return step


def _worker(rank: int, init: str, workload: str, tasks: list[int], reps: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two processes on two cores
    lines: list[str] = []
    try:
        wl = WORKLOADS[workload]
        for T in tasks:
            base = wl.model(T)
            x, targets = wl.data(T, seed=10 + rank)
            params = sum(p.numel() for p in base.parameters())
            shared = sum(p.numel() for p in base.backbone.parameters())
            models = {name: DDP(copy.deepcopy(base)) for name in ("plain", "exact", "sketch", "local")}
            monitors = {
                mode: ConflictMonitor(models[mode], shared=models[mode].module.backbone, sync=mode)
                for mode in ("exact", "sketch", "local")
            }

            calls = {"plain": _plain_step(models["plain"], x, targets)}
            calls.update({mode: _monitored_step(monitors[mode], models[mode], x, targets) for mode in monitors})
            before = {k: (lambda m=models[k]: m.zero_grad(set_to_none=True)) for k in calls}
            dist.barrier()
            times = round_robin(calls, warmup=3, reps=reps, device=torch.device("cpu"), before=before)
            sent = {}
            for mode, monitor in monitors.items():
                start = monitor._sync.bytes_sent
                models[mode].zero_grad()
                monitor.backward(task_losses(models[mode](x), targets))
                sent[mode] = monitor._sync.bytes_sent - start
            errors = {}
            for k in SKETCH_SIZES:
                worst = []
                for s in range(5):
                    xs, ts = wl.data(T, seed=100 + 10 * s + rank)
                    e = DDP(copy.deepcopy(base))
                    sk = DDP(copy.deepcopy(base))
                    with (
                        ConflictMonitor(e, shared=e.module.backbone) as exact,
                        ConflictMonitor(sk, shared=sk.module.backbone, sync="sketch", sketch_size=k) as sketch,
                    ):
                        for _ in range(s + 1):  # fresh hashing at each step
                            G = exact.measure(task_losses(e(xs), ts)).gram.double()
                            S = sketch.measure(task_losses(sk(xs), ts)).gram.double()
                    n = G.diagonal().sqrt()
                    worst.append(float(((S - G).abs() / torch.outer(n, n)).max()))
                errors[k] = (statistics.mean(worst), max(worst))
            for monitor in monitors.values():
                monitor.close()
            if rank == 0:
                p = median(times["plain"])
                lines.append(f"### {wl.description}, T={T}, {WORLD} ranks\n")
                lines.append(
                    f"Parameters: {params:,} ({shared:,} shared). DDP all-reduces {4 * params:,} bytes a step.\n"
                )
                lines.append("| mode | ms | x plain DDP step | bytes sent by the monitor per measured step | x DDP's |")
                lines.append("|---|---:|---:|---:|---:|")
                lines.append(f"| plain DDP step | {p * 1e3:.2f} | 1.00 | - | - |")
                for mode in monitors:
                    t = median(times[mode])
                    lines.append(
                        f"| {mode} | {t * 1e3:.2f} | {t / p:.2f} | {sent[mode]:,} | {sent[mode] / (4 * params):.2f} |"
                    )
                lines.append("")
                lines.append("Sketch error, `max |G_sketch - G| / (n_i n_j)` over the entries of the Gram, 5 draws:\n")
                lines.append("| k | mean of the worst entry | worst entry | sqrt(2/k) |")
                lines.append("|---:|---:|---:|---:|")
                for k, (mean_err, max_err) in errors.items():
                    lines.append(f"| {k} | {mean_err:.3f} | {max_err:.3f} | {sketch_std(k):.3f} |")
                lines.append("")
        if rank == 0:
            Path(out).write_text("\n".join(lines) + "\n")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="mlp-b64", choices=list(WORKLOADS))
    p.add_argument("--tasks", type=int, nargs="+", default=[4])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--output", default=str(Path(__file__).with_name("DISTRIBUTED.md")))
    args = p.parse_args(argv)
    started = time.perf_counter()
    folder = tempfile.mkdtemp()
    body = os.path.join(folder, "body.md")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(
        _worker, args=(os.path.join(folder, "init"), args.workload, args.tasks, args.reps, body), nprocs=WORLD
    )
    command = "python -m benchmarks.distributed " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [
        "# gradconflict under DistributedDataParallel",
        "",
        "Generated by `benchmarks/distributed.py`; ratios, not absolute times, are the figures that matter.",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.platform()}; {os.cpu_count()} logical cores; {WORLD} processes, 1 torch thread each,"
        " gloo over loopback",
        f"- torch {torch.__version__}",
        f"- command: `{command.strip()}`; wall time {time.perf_counter() - started:.0f} s",
        "",
        "Each step: forward of each rank's own batch, then `monitor.backward` (every step measured) or a plain",
        "`sum(losses).backward()`; DDP averages the gradients. Times: median of round-robin repetitions.",
        "",
    ]
    Path(args.output).write_text("\n".join(head) + Path(body).read_text())
    print(Path(args.output).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
