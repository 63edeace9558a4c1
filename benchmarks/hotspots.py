"""Where the time of one route goes: cProfile (Python overhead) and torch.profiler (operators).

    python -m benchmarks.hotspots                       # gradconflict default engine, mlp-b64, T=4
    python -m benchmarks.hotspots --route gc --workload transformer --tasks 4 --steps 20
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from benchmarks import routes as R
from benchmarks.workloads import WORKLOADS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hotspots", description=__doc__.split("\n")[0])
    p.add_argument("--route", default="gc", choices=list(R.ROUTES))
    p.add_argument("--workload", default="mlp-b64", choices=list(WORKLOADS))
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    wl = WORKLOADS[args.workload]
    base = wl.model(args.tasks).to(device)
    x, targets = wl.data(args.tasks)
    x, targets = x.to(device), {k: t.to(device) for k, t in targets.items()}
    route = R.build(args.route, base, x, targets, batchnorm=wl.batchnorm)
    plain = R.build("plain", base, x, targets)

    def run(r: R.Route, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            r.zero_grad()
            r.step()
        return (time.perf_counter() - t0) / n / r.steps_per_call * 1e3

    run(route, 3)
    run(plain, 3)
    print(f"{args.route} {run(route, args.steps):.2f} ms/step, plain {run(plain, args.steps):.2f} ms/step "
          f"({wl.name}, T={args.tasks})")

    prof = cProfile.Profile()
    prof.enable()
    run(route, args.steps)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    print(f"\n=== cProfile, {args.steps} steps, by own time ===")
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
    print(f"\n=== cProfile, {args.steps} steps, by cumulative time ===")
    print(s.getvalue())

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as tp:
        run(route, 10)
    print("\n=== torch.profiler, 10 steps, by self CPU time ===")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    route.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
