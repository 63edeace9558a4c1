"""Round-robin median timer and a peak-memory probe.

Timing: every repetition runs every route once, in an order rotated by one place per repetition, so slow
drifts and bursts of noise on a shared machine hit all routes alike; the first ``warmup`` repetitions are
discarded and the median of the rest is reported (``time.perf_counter``; CUDA is synchronised around each
call).

Memory (measured on each route's first, untimed call, which is also its correctness check and warm-up): on
CUDA, ``torch.cuda.max_memory_allocated`` above the level at the call's start. On CPU there is no allocator
statistic, so that call runs under ``torch.profiler`` with ``profile_memory=True``;
its allocation events carry the running total of bytes allocated through torch's CPU allocator since the
profiler started, and the peak of that total is reported: the most tensor memory the step held at once above
what was alive before it (parameters, batch, and anything kept from earlier steps are not counted; the
``.grad`` tensors the step leaves behind are).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int,
    reps: int,
    device: torch.device,
    before: dict[str, Callable[[], None]] | None = None,
    per_call: dict[str, int] | None = None,
    budget_s: float | None = None,
    min_reps: int = 3,
) -> dict[str, list[float]]:
    """Seconds per step of every call, ``reps`` (timed) repetitions each after ``warmup`` discarded ones.

    ``before[k]`` runs untimed before each call (``zero_grad``); ``per_call[k]`` divides call ``k``'s time
    (a call that runs 10 steps). With ``budget_s``, the number of timed repetitions is cut (not below
    ``min_reps``) so that they fit in about that many seconds, estimated from the first repetition.
    """
    keys = list(calls)
    before = before or {}
    per_call = per_call or {}
    times: dict[str, list[float]] = {k: [] for k in keys}
    total = warmup + reps
    r = 0
    while r < total:
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        rep_start = time.perf_counter()
        for k in order:
            if k in before:
                before[k]()
            _sync(device)
            t0 = time.perf_counter()
            calls[k]()
            _sync(device)
            t1 = time.perf_counter()
            if r >= warmup:
                times[k].append((t1 - t0) / per_call.get(k, 1))
        rep_s = time.perf_counter() - rep_start
        if r == 0 and budget_s is not None:
            total = warmup + max(min_reps, min(reps, int(budget_s / max(rep_s, 1e-9))))
        r += 1
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (Kineto prints two lines per profiler session there); Python exceptions and
    warnings are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above the level at its start (see the module docstring)."""
    gc.collect()  # garbage of earlier work must not be freed (and counted negative) in the middle of the call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    mem = [e["args"] for e in sorted(events, key=lambda e: e.get("ts", 0)) if e.get("name") == "[memory]"]
    if not mem:
        return None
    # "Total Allocated" is a process-wide running total that keeps counting memory freed outside profiler
    # sessions (e.g. last step's .grad); the level just before the first event is the step's baseline
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(0, *(m["Total Allocated"] - base for m in mem))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repetitions were."""
    return (max(values) - min(values)) / median(values) if values else float("nan")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
