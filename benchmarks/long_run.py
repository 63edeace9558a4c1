"""Long runs: ``gradconflict report`` (with and without its HTML page, ``-o``) and ``gradconflict advise`` on
synthetic histories of 10^5 and 10^6 steps, timed and their peak memory measured: ``python -m benchmarks.long_run``.

Each history is a JSONL file as a :class:`~gradconflict.JSONLSink` writes it (``T`` tasks, ``L`` layers, every
metric on every line). To write 10^6 lines quickly, the file repeats the lines of ``--distinct`` real reports,
each over a run of consecutive steps (its own step number on each line), the conflict between the first two
tasks deepening from one report to the next, so that the run has a trend to find. Each command runs in a fresh
interpreter (``python -m gradconflict``); its wall time is measured around it and its peak memory is the child's
maximum resident set size (``os.wait4``), the interpreter and torch included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradconflict import ConflictReport, LayerReport
from gradconflict.records.history import LINE_SCHEMA, report_line
from gradconflict.records.sinks.jsonl import _row
from gradconflict.records.sinks.packed import PackedWriter, packed_path


def _reports(tasks: int, layers: int, distinct: int, seed: int) -> list[str]:
    """``distinct`` JSONL lines of random Grams, the first two tasks' cosine falling from +0.5 to -0.5."""
    generator = torch.Generator().manual_seed(seed)
    names = tuple("abcdefghijklmnop"[:tasks])
    lines = []
    for k in range(distinct):
        grams = []
        for _ in range(layers):
            J = torch.randn(tasks, 16, generator=generator, dtype=torch.float64)
            drift = 0.5 - k / max(distinct - 1, 1)  # task b leans to +a, then to -a
            J[1] = J[1] + 2.0 * drift * J[0]
            grams.append(J @ J.T)
        ls = {f"backbone.{n}": LayerReport(f"backbone.{n}", names, g, num_params=4096) for n, g in enumerate(grams)}
        losses = torch.rand(tasks, generator=generator, dtype=torch.float64)
        report = ConflictReport(
            names, torch.stack(grams).sum(0), losses=losses, layers=ls, step=0, engine="tapped", strategy="batched"
        )
        lines.append(report_line(report))
    return lines


def write_history(path: Path, steps: int, tasks: int, layers: int, distinct: int, seed: int = 0,
                  packed: bool = True) -> int:
    """Write a ``steps``-line history to ``path``, and its packed file as a ``JSONLSink`` writes it unless
    ``packed=False``; returns the JSONL's size in bytes."""
    lines = _reports(tasks, layers, distinct, seed)
    head = f'{{"schema": {LINE_SCHEMA}, "step": 0,'
    assert all(line.startswith(head) for line in lines)
    rows = [_row(json.loads(line)) for line in lines]  # a line's layout and row do not depend on its step
    writer = PackedWriter(path, overwrite=True) if packed else None
    if not packed:
        packed_path(path).unlink(missing_ok=True)
    with path.open("wb") as f:
        for s in range(steps):
            k = s * distinct // steps
            line = f'{{"schema": {LINE_SCHEMA}, "step": {s},{lines[k][len(head):]}'.encode()
            f.write(line)
            if writer is not None:
                f.flush()  # as the sink does: a frame never covers a line not yet written
                writer.add(rows[k][0], rows[k][1], s, rows[k][2], line)
    if writer is not None:
        writer.close()
    return path.stat().st_size


def run(command: list[str]) -> tuple[float, float, int]:
    """``(wall seconds, peak resident MB, exit status)`` of one command in a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    err = process.stderr.read().decode() if process.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(f"  {' '.join(command)} exited {code}: {err.strip()[-500:]}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, code  # ru_maxrss is in kB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_run", description=__doc__)
    parser.add_argument("--steps", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--distinct", type=int, default=1000, help="distinct reports the file repeats")
    parser.add_argument("--dir", default=None, help="where to write the histories (default: a temporary folder)")
    parser.add_argument("--no-packed", action="store_true",
                        help="write no packed file: the readers decode the JSON of every line")
    args = parser.parse_args(argv)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="gradconflict-long-run-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{platform.platform()}; python {platform.python_version()}; {os.cpu_count()} logical cores; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"T = {args.tasks} tasks, L = {args.layers} layers; packed file: {'no' if args.no_packed else 'yes'}; "
          "limits: 60 s and 1024 MB per command\n")
    print("| steps | file | command | wall s | peak MB | status |")
    print("|---:|---:|---|---:|---:|---|")
    failed = False
    for steps in args.steps:
        path = folder / f"run-{steps}.jsonl"
        size = write_history(path, steps, args.tasks, args.layers, args.distinct, packed=not args.no_packed)
        html = folder / f"run-{steps}.html"
        for name, options in (("report", []), ("report -o", ["-o", str(html)]), ("advise", [])):
            wall, peak, code = run([sys.executable, "-m", "gradconflict", name.split()[0], str(path), *options])
            within = code == 0 and wall <= 60 and peak <= 1024
            failed |= not within
            verdict = "within" if within else f"OVER (exit {code})" if code else "OVER"
            print(f"| {steps:,} | {size / 2**20:,.0f} MB | {name} | {wall:.1f} | {peak:,.0f} | {verdict} |",
                  flush=True)
        path.unlink()
        packed_path(path).unlink(missing_ok=True)
        html.unlink(missing_ok=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
